//! Build script: `refinery::embed_migrations!` (src/store.rs) reads `migrations/` when the crate
//! compiles, and cargo does not know it does, so a changed or new migration alone would not
//! rebuild the worker. This tells cargo to.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
