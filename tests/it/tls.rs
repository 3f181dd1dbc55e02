//! TLS to RabbitMQ and Postgres (SPEC §6), against the servers `.ci/tls.sh` starts: RabbitMQ
//! with a TLS-only listener on 5671 and Postgres with `hostssl`-only access on 5433, both with a
//! certificate for `localhost` and `127.0.0.1` from a test CA.

use crate::helpers::{Producer, TestWorker, wait_for};
use catchall::config::Config;
use catchall::store::Store;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use std::path::PathBuf;
use std::time::Duration;

/// Where `.ci/tls.sh` wrote the certificates.
fn cert(name: &str) -> String {
    let dir = std::env::var("CATCHALL_CI_DIR").unwrap_or_else(|_| "/tmp/catchall-ci".into());
    let path = PathBuf::from(dir).join("certs").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash .ci/tls.sh` (make test does)",
        path.display()
    );
    path.display().to_string()
}

/// The TLS broker, as `guest` over PLAIN, trusting `ca`.
fn amqps(host: &str, ca: Option<&str>) -> String {
    match ca {
        Some(ca) => format!(
            "amqps://guest:guest@{host}:5671/%2f?cacertfile={}",
            cert(ca)
        ),
        None => format!("amqps://guest:guest@{host}:5671/%2f"),
    }
}

/// The TLS Postgres as `user`, database `db`, with extra libpq parameters.
fn pg_url(user: &str, host: &str, db: &str, params: &str) -> String {
    format!("postgres://{user}@{host}:5433/{db}?{params}")
}

fn verify_full() -> String {
    format!("sslmode=verify-full&sslrootcert={}", cert("ca.pem"))
}

fn client_cert() -> String {
    format!(
        "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        cert("ca.pem"),
        cert("client.pem"),
        cert("client.key")
    )
}

/// A client certificate over loopback with the default `sslmode` (`prefer`): presented over
/// TLS, and the hostssl-only server lets the client in. TLS used to be dropped over loopback
/// under `prefer`, certificate and all, and the server refused the login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_over_loopback_is_presented_with_the_default_sslmode() {
    let db = TlsDb::create().await;
    let params = format!(
        "sslcert={}&sslkey={}",
        cert("client.pem"),
        cert("client.key")
    );
    let url = pg_url("catchall_client", "localhost", &db.name, &params);
    let store = catchall::store::Store::connect(&url, 1)
        .await
        .expect("connects over TLS with the certificate");
    store
        .ping_within(std::time::Duration::from_secs(5))
        .await
        .expect("answers");
    drop(store);
}

/// A database on the TLS Postgres owned by `catchall_client`, dropped at the end.
struct TlsDb {
    name: String,
}

impl TlsDb {
    async fn create() -> Self {
        let name = format!("test_{}", uuid::Uuid::now_v7().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\" OWNER catchall_client"))
            .await
            .expect("create the test database on 5433");
        Self { name }
    }
}

impl Drop for TlsDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let _ = admin()
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            });
        })
        .join();
        // A second panic while the test fails would abort the process and hide its message.
        if joined.is_err() && !std::thread::panicking() {
            panic!("drop the test database");
        }
    }
}

/// `postgres` on the TLS Postgres (hostssl, trust), through the same connect code as the worker.
async fn admin() -> tokio_postgres::Client {
    let (config, tls) =
        catchall::pg::config(&pg_url("postgres", "localhost", "postgres", &verify_full()))
            .expect("admin URL parses");
    let (client, connection) = config
        .connect(tls)
        .await
        .expect("the TLS Postgres must answer on localhost:5433 (run .ci/tls.sh)");
    tokio::spawn(connection);
    client
}

/// Deletes a test's exchanges and queues on the TLS broker.
async fn delete_topology(exchange: &str, queue: &str) {
    let url = amqps("localhost", Some("ca.pem"));
    if let Ok(connection) = catchall::amqp::connect(&url, "test cleanup").await {
        if let Ok(channel) = connection.create_channel().await {
            for q in [queue.to_string(), format!("{queue}.dead")] {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in [exchange.to_string(), format!("{exchange}.dlx")] {
                let _ = channel
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "".into()).await;
    }
}

/// The worker consumes over amqps:// (logging in with its client certificate, EXTERNAL) and
/// writes over `sslmode=verify-full` (logging in with its client certificate, `cert` in
/// pg_hba.conf); the producer publishes over amqps:// as guest. Every event is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_counts_over_amqps_and_verify_full_with_client_certificates() {
    let db = TlsDb::create().await;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let (exchange, queue) = (format!("test.{id}.events"), format!("test.{id}.queue"));
    let _topology = TlsTopology(exchange.clone(), queue.clone());

    let database_url = pg_url("catchall_client", "localhost", &db.name, &client_cert());
    let mut config = Config::with_names(&database_url, &exchange, &queue);
    config.amqp.amqp_url = format!(
        "amqps://localhost:5671/%2f?auth_mechanism=external&cacertfile={}&certfile={}&keyfile={}",
        cert("ca.pem"),
        cert("client.pem"),
        cert("client.key")
    );
    let worker = TestWorker::start(config).await;
    worker.ready().await;

    let env = vec![
        ("AMQP_URL", amqps("localhost", Some("ca.pem"))),
        ("CATCHALL_EXCHANGE", exchange.clone()),
        ("CATCHALL_QUEUE", queue.clone()),
    ];
    let expected = Producer::spawn(env, &["--events", "3000", "--batch", "50", "--seed", "9"])
        .finish()
        .await;
    assert_eq!(expected.values().map(|(d, b)| d + b).sum::<i64>(), 3000);

    let (config, tls) = catchall::pg::config(&database_url).expect("URL parses");
    let (client, connection) = config
        .connect(tls)
        .await
        .expect("connect with the client certificate");
    tokio::spawn(connection);
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("who am I")
        .get(0);
    assert_eq!(user, "catchall_client", "logged in by certificate");
    wait_for(Duration::from_secs(60), "every event counted", || {
        let client = &client;
        let expected = &expected;
        async move {
            let rows = client
                .query("SELECT domain, delivered, bounced FROM domains", &[])
                .await
                .ok()?;
            let counts: std::collections::HashMap<String, (i64, i64)> = rows
                .iter()
                .map(|row| (row.get(0), (row.get(1), row.get(2))))
                .collect();
            (counts == *expected).then_some(())
        }
    })
    .await;
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE datname = current_database() AND ssl AND usename = 'catchall_client' \
             AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0);
    assert!(
        encrypted >= 1,
        "the worker's connections (not this test's) use TLS: {encrypted}"
    );

    worker.stop().await;
    drop(client);
}

/// A test's exchange and queue names on the TLS broker, whose data outlives the test: deleted
/// on drop, also when the test fails.
struct TlsTopology(String, String);

impl Drop for TlsTopology {
    fn drop(&mut self) {
        let (exchange, queue) = (self.0.clone(), self.1.clone());
        crate::helpers::run_blocking(async move { delete_topology(&exchange, &queue).await });
    }
}

/// Refused with a clear error naming the host and the reason: a certificate from another CA,
/// a host name the certificate does not name (127.0.0.2), and no CA where the system roots do
/// not know the test CA. `verify-ca` accepts the other name (chain only), `require` checks
/// nothing, like libpq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_certificates_it_cannot_verify() {
    // RabbitMQ.
    let refused = |url: String| async move {
        let error = catchall::amqp::connect(&url, "test refused")
            .await
            .err()
            .unwrap_or_else(|| panic!("{url} must be refused"));
        format!("{:#}", anyhow::Error::new(error))
    };
    let other_ca = refused(amqps("localhost", Some("other-ca.pem"))).await;
    assert!(
        other_ca.contains("the certificate of localhost is not signed by a CA in the CA file")
            && other_ca.contains("other-ca.pem"),
        "{other_ca}"
    );
    let wrong_host = refused(amqps("127.0.0.2", Some("ca.pem"))).await;
    assert!(
        wrong_host.contains("the certificate of 127.0.0.2 does not name 127.0.0.2"),
        "{wrong_host}"
    );
    let system = refused(amqps("localhost", None)).await;
    assert!(
        system.contains(
            "the certificate of localhost is not signed by a CA in the system's trusted roots"
        ),
        "{system}"
    );
    assert!(
        !system.contains("guest:guest"),
        "no password in errors: {system}"
    );
    eprintln!("amqps refused:\n  {other_ca}\n  {wrong_host}\n  {system}");
    let good = catchall::amqp::connect(&amqps("localhost", Some("ca.pem")), "test good")
        .await
        .expect("the right CA and name connect");
    let _ = good.close(200, "".into()).await;

    // Postgres.
    let pg_refused = |url: String| async move {
        let error = Store::connect(&url, 1)
            .await
            .err()
            .unwrap_or_else(|| panic!("{url} must be refused"));
        format!("{:#}", anyhow::Error::new(error))
    };
    let other_ca = pg_refused(pg_url(
        "postgres:secret",
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={}", cert("other-ca.pem")),
    ))
    .await;
    assert!(
        other_ca.contains("the certificate of localhost is not signed by a CA in the CA file")
            && other_ca.contains("other-ca.pem")
            && !other_ca.contains("secret"),
        "{other_ca}"
    );
    let wrong_host = pg_refused(pg_url("postgres", "127.0.0.2", "postgres", &verify_full())).await;
    assert!(
        wrong_host.contains("the certificate of 127.0.0.2 does not name 127.0.0.2"),
        "{wrong_host}"
    );
    let system = pg_refused(pg_url(
        "postgres",
        "localhost",
        "postgres",
        "sslmode=verify-full",
    ))
    .await;
    assert!(
        system.contains("not signed by a CA in the system's trusted roots"),
        "{system}"
    );
    for params in [
        format!("sslmode=verify-ca&sslrootcert={}", cert("ca.pem")),
        "sslmode=require".to_string(),
    ] {
        Store::connect(&pg_url("postgres", "127.0.0.2", "postgres", &params), 1)
            .await
            .unwrap_or_else(|error| panic!("{params} accepts another host name: {error:#}"));
    }
    eprintln!("postgres refused:\n  {other_ca}\n  {wrong_host}\n  {system}");
    // hostssl only: without TLS the server refuses.
    let plain = pg_refused(pg_url(
        "postgres",
        "localhost",
        "postgres",
        "sslmode=disable",
    ))
    .await;
    assert!(plain.contains("no encryption"), "{plain}");
}

/// A worker whose broker certificate cannot be verified says why on /readyz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_readyz_names_a_refused_broker_certificate() {
    let db = TlsDb::create().await;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let database_url = pg_url("catchall_client", "localhost", &db.name, &client_cert());
    let (exchange, queue) = (format!("test.{id}.e"), format!("test.{id}.q"));
    // Declared on the TLS broker only if the certificate is wrongly accepted: removed then too.
    let _topology = TlsTopology(exchange.clone(), queue.clone());
    let mut config = Config::with_names(&database_url, &exchange, &queue);
    config.amqp.amqp_url = amqps("127.0.0.2", Some("ca.pem"));
    let worker = TestWorker::start(config).await;
    let url = worker.url("/readyz");
    let reason = wait_for(
        Duration::from_secs(20),
        "/readyz to name the certificate",
        || {
            let url = url.clone();
            async move {
                let response = reqwest::get(&url).await.ok()?;
                if response.status() != 503 {
                    return None;
                }
                let body: serde_json::Value = response.json().await.ok()?;
                let error = body["error"].as_str()?.to_string();
                error.contains("certificate").then_some(error)
            }
        },
    )
    .await;
    assert!(
        reason.contains("the certificate of 127.0.0.2 does not name 127.0.0.2"),
        "{reason}"
    );
    worker.stop().await;
}

/// TLS files renewed in place (cert-manager, a mounted Secret, a CA rotation) are read again
/// at the next connection, without a restart. Each step replaces the CA file by a rename (a
/// new inode, as a Secret's swap) and ends the store's backend, so the pool connects again:
/// - a file that does not parse: logged, and the previous setting kept (the store connects);
/// - another CA: the new connection is refused, naming the certificate (before, the files were
///   read once at start, and it connected);
/// - the right CA again: it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_postgres_tls_files_are_used_by_the_next_connection() {
    let db = TlsDb::create().await;
    let dir = std::env::temp_dir();
    let id = uuid::Uuid::now_v7().simple();
    let ca = crate::helpers::TempFile(dir.join(format!("catchall-ca-{id}.pem")));
    let next = crate::helpers::TempFile(dir.join(format!("catchall-ca-{id}.next")));
    std::fs::copy(cert("ca.pem"), &ca.0).expect("copy the CA file");
    let params = format!(
        "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        ca.0.display(),
        cert("client.pem"),
        cert("client.key")
    );
    let store = Store::connect(
        &pg_url("catchall_client", "localhost", &db.name, &params),
        1,
    )
    .await
    .expect("connects with the CA file");
    let admin = admin().await;
    let backends = || backends_of(&admin, &db.name);
    let old = swap_and_end(&admin, &db.name, &ca.0, &next.0, b"not a certificate\n").await;
    wait_for(
        Duration::from_secs(20),
        "a new connection with the previous CA kept",
        || async {
            let pids = backends().await;
            (store.ping_within(Duration::from_secs(5)).await.is_ok()
                && !pids.is_empty()
                && !pids.contains(&old))
            .then_some(())
        },
    )
    .await;

    let other = std::fs::read(cert("other-ca.pem")).expect("read other-ca.pem");
    swap_and_end(&admin, &db.name, &ca.0, &next.0, &other).await;
    let refused = wait_for(
        Duration::from_secs(20),
        "the next connection to use the other CA",
        || async {
            match store.ping_within(Duration::from_secs(5)).await {
                Err(error) => {
                    let text = format!("{:#}", anyhow::Error::new(error));
                    text.contains("not signed by a CA in the CA file")
                        .then_some(text)
                }
                Ok(()) => None,
            }
        },
    )
    .await;
    eprintln!("refused after the CA file changed: {refused}");

    std::fs::copy(cert("ca.pem"), &next.0).expect("copy the CA file");
    std::fs::rename(&next.0, &ca.0).expect("swap the right CA file in");
    wait_for(Duration::from_secs(20), "connecting again", || async {
        store.ping_within(Duration::from_secs(5)).await.ok()
    })
    .await;
    drop(store);
}

/// The pids of the backends connected to `db`.
async fn backends_of(admin: &tokio_postgres::Client, db: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1",
            &[&db],
        )
        .await
        .expect("list the backends")
        .iter()
        .map(|row| row.get::<_, i32>(0))
        .collect()
}

/// Writes `pem` to `next`, renames it over `ca` (a new inode, as a Secret's swap), ends the one
/// backend on `db`, and returns its pid.
async fn swap_and_end(
    admin: &tokio_postgres::Client,
    db: &str,
    ca: &std::path::Path,
    next: &std::path::Path,
    pem: &[u8],
) -> i32 {
    std::fs::write(next, pem).expect("write the new CA file");
    std::fs::rename(next, ca).expect("swap the CA file in");
    let old = backends_of(admin, db).await;
    assert_eq!(old.len(), 1, "one connection in the store's pool: {old:?}");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&old[0]])
        .await
        .expect("end the store's backend");
    old[0]
}
