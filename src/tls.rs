//! TLS for both connections (RabbitMQ and Postgres), with rustls and ring (no OpenSSL).
//!
//! One place decides what is trusted: a CA file the operator names, else the system roots, and
//! how much of the server's certificate is checked ([`Verify`]). A certificate that fails is an
//! error naming the host and the reason in plain words, so the log and `/readyz` say what to fix.

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors building a TLS configuration (reading files, parsing PEM); verification failures
/// happen later, during the handshake, and are explained by the verifier.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("no system root certificate could be loaded ({0}); name a CA file")]
    NoSystemRoots(String),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Which certificates may sign the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The CA certificates in this PEM file, and no others.
    File(PathBuf),
    /// The operating system's trust store.
    System,
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The chain up to a trusted root, and that the certificate names the host.
    Full,
    /// The chain only (libpq's `verify-ca`): any host name is accepted.
    ChainOnly,
    /// Nothing (libpq's `require` and `prefer` without a root certificate): encryption against a
    /// passive eavesdropper only.
    None,
}

/// A client certificate chain and its private key, for servers that authenticate clients by
/// certificate (RabbitMQ `EXTERNAL`, Postgres `cert`).
#[derive(Debug)]
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads a PEM certificate (chain) and a PEM private key (PKCS#8, PKCS#1 or SEC1),
    /// unencrypted: an encrypted key is refused with a word on how to decrypt it (it was "no
    /// items found", and `sslpassword` or the Erlang client's `password` is not read).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(key).map_err(|source| TlsError::Read {
            what: "private key",
            path: key.to_path_buf(),
            source,
        })?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
            // What does not load, if it is an encrypted key, says so.
            let has = |marker: &[u8]| pem.windows(marker.len()).any(|w| w == marker);
            let reason = if has(b"ENCRYPTED PRIVATE KEY") || has(b"Proc-Type: 4,ENCRYPTED") {
                "encrypted, which is not supported: give the key unencrypted (`openssl pkey -in \
                 KEY -out KEY.plain`) in a file only the worker can read"
                    .to_string()
            } else {
                error.to_string()
            };
            TlsError::Key {
                path: key.to_path_buf(),
                reason,
            }
        })?;
        let certs = read_certs(cert, "client certificate")?;
        Ok(Self { certs, key })
    }
}

/// A TLS setting built from files and built again when they change: a certificate or CA file
/// renewed in place (cert-manager, a mounted Kubernetes Secret, a CA rotation) is used by the
/// next connection, without a restart. The files are looked at (`stat`, following symlinks as a
/// Secret's `..data` swap needs) each time a connection is made; a change that does not build
/// (a key written before its certificate, say) is logged and the last good setting kept, and
/// it is tried again once they change again.
pub struct Reloading<T> {
    files: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    state: std::sync::Mutex<Loaded<T>>,
}

struct Loaded<T> {
    /// The files as they were when `value` was built.
    seen: Vec<Option<Stamp>>,
    /// The files as they were when a build last failed (warned about once).
    failed: Option<Vec<Option<Stamp>>>,
    value: T,
}

/// What tells a file changed: its modification and change times, size and inode (the change
/// time also moves when a copy keeps the old modification time, `cp -p`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    changed: (i64, i64),
    len: u64,
    inode: u64,
}

fn stamps(files: &[PathBuf]) -> Vec<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|path| {
            std::fs::metadata(path).ok().map(|meta| Stamp {
                modified: meta.modified().ok(),
                changed: (meta.ctime(), meta.ctime_nsec()),
                len: meta.len(),
                inode: meta.ino(),
            })
        })
        .collect()
}

impl<T: Clone> Reloading<T> {
    /// Builds the setting now (an error here is a configuration error at start) and watches
    /// `files` (the CA file, the client certificate and its key: those of them in use).
    pub fn new(
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let seen = stamps(&files);
        let value = build()?;
        Ok(Self {
            files,
            build: Box::new(build),
            state: std::sync::Mutex::new(Loaded {
                seen,
                failed: None,
                value,
            }),
        })
    }

    /// The setting for a new connection: built again first if a file changed since. The build
    /// runs outside the lock (other connections go on with the current setting meanwhile).
    pub fn current(&self, what: &str) -> T {
        let now = stamps(&self.files);
        {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if now == state.seen || state.failed.as_ref() == Some(&now) {
                return state.value.clone();
            }
        }
        let built = (self.build)();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match built {
            Ok(value) => {
                tracing::info!(files = ?self.files, "{what}: TLS files changed; reloaded");
                state.seen = now;
                state.failed = None;
                state.value = value;
            }
            Err(error) => {
                tracing::warn!(
                    files = ?self.files,
                    "{what}: TLS files changed but cannot be used ({error}); keeping the \
                     previous ones until they change again"
                );
                state.failed = Some(now);
            }
        }
        state.value.clone()
    }
}

/// The crypto provider every TLS connection uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client configuration: trust `roots` (unused with [`Verify::None`]), check as much
/// as `verify` says, and present `identity` if the server asks for a client certificate.
pub fn client_config(
    roots: &Roots,
    verify: Verify,
    identity: Option<Identity>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let inner = match verify {
        Verify::None => None,
        Verify::Full | Verify::ChainOnly => Some(
            WebPkiServerVerifier::builder_with_provider(root_store(roots)?, provider.clone())
                .build()
                .map_err(|error| TlsError::NoSystemRoots(error.to_string()))?,
        ),
    };
    let verifier = Arc::new(Verifier {
        inner,
        verify,
        algorithms: provider.signature_verification_algorithms,
        roots: roots.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match identity {
        Some(identity) => builder.with_client_auth_cert(identity.certs, identity.key)?,
        None => builder.with_no_client_auth(),
    })
}

/// The trust anchors `roots` names. A CA file is read at every call (it may have been
/// renewed); the system's trust store once per process (see [`system_roots`]).
pub fn root_store(roots: &Roots) -> Result<Arc<RootCertStore>, TlsError> {
    match roots {
        Roots::File(path) => {
            let mut store = RootCertStore::empty();
            for cert in read_certs(path, "CA file")? {
                store.add(cert)?;
            }
            Ok(Arc::new(store))
        }
        Roots::System => system_roots(),
    }
}

/// The system's trusted roots, read on first use and kept: reading the OS trust store is
/// hundreds of file reads, and a TLS setting is built on a runtime thread (a RabbitMQ
/// connection's at every attempt, a Postgres one's when its files changed), where it would
/// hold up the tasks behind it. A change to the system's store is used after a restart.
/// A store that did not load is not kept: the next call reads it again.
fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let loaded = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsError::NoSystemRoots(if errors.is_empty() {
            "the trust store is empty".into()
        } else {
            errors.join("; ")
        }));
    }
    Ok(ROOTS.get_or_init(|| Arc::new(store)).clone())
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Checks the server's certificate as [`Verify`] says, and turns a failure into a sentence that
/// names the host and the reason.
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    verify: Verify,
    algorithms: WebPkiSupportedAlgorithms,
    roots: Roots,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(verified) => Ok(verified),
            // webpki checks the name after the chain, so the chain is good here.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.verify == Verify::ChainOnly => Ok(ServerCertVerified::assertion()),
            // `Other` displays the explanation as it is ("other error: the certificate of …").
            Err(error) => Err(rustls::Error::Other(rustls::OtherError(Arc::new(
                Explained(explain(server_name, &error, &self.roots)),
            )))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A verification failure in words.
#[derive(Debug)]
struct Explained(String);

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Explained {}

/// "the certificate of HOST REASON", in words an operator can act on.
fn explain(server_name: &ServerName<'_>, error: &rustls::Error, roots: &Roots) -> String {
    let host = server_name.to_str();
    let trusted = match roots {
        Roots::File(path) => format!("the CA file {}", path.display()),
        Roots::System => "the system's trusted roots (name a CA file to trust a private CA)".into(),
    };
    let reason = match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => {
                format!("is not signed by a CA in {trusted}")
            }
            CertificateError::NotValidForName => format!("does not name {host}"),
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "does not name {host} (it names {})",
                if presented.is_empty() {
                    "no host".to_string()
                } else {
                    presented.join(", ")
                }
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "is not valid yet".into()
            }
            CertificateError::Revoked => "is revoked".into(),
            CertificateError::BadSignature => "has a bad signature".into(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "is not meant for a TLS server".into()
            }
            other => format!("is invalid ({other:?})"),
        },
        other => format!("is invalid ({other})"),
    };
    format!("the certificate of {host} {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_a_certificate_for_another_host() {
        let name = ServerName::try_from("127.0.0.2").unwrap();
        let error = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: name.to_owned(),
            presented: vec!["DnsName(\"localhost\")".into()],
        });
        let text = explain(&name, &error, &Roots::System);
        assert!(
            text.contains("127.0.0.2") && text.contains("does not name"),
            "{text}"
        );
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let text = explain(&name, &unknown, &Roots::File("/x/ca.pem".into()));
        assert!(
            text.contains("not signed by a CA in the CA file /x/ca.pem"),
            "{text}"
        );
    }

    /// An encrypted key (PKCS#8 or the traditional PEM header) is named as such; it was "no
    /// items found".
    #[test]
    fn an_encrypted_private_key_is_named_as_such() {
        let dir = std::env::temp_dir().join(format!("catchall-tls-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, pem) in [
            (
                "pkcs8.pem",
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
            ),
            (
                "pkcs1.pem",
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00\n\nMIIB\n-----END RSA PRIVATE KEY-----\n",
            ),
        ] {
            let key = dir.join(name);
            std::fs::write(&key, pem).unwrap();
            let error = Identity::from_files(&dir.join("cert.pem"), &key).unwrap_err();
            assert!(error.to_string().contains("encrypted"), "{name}: {error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let error = client_config(
            &Roots::File("/nonexistent/ca.pem".into()),
            Verify::Full,
            None,
        )
        .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
        // The key is read first (an encrypted one is refused before the certificate is read).
        let error =
            Identity::from_files(Path::new("/nonexistent/c.pem"), Path::new("/k")).unwrap_err();
        assert!(error.to_string().contains("private key /k"), "{error}");
    }

    /// The system's trust store is read once (it was read again at every RabbitMQ connection
    /// attempt, on a runtime thread); a CA file is read at every call, as it may be renewed.
    #[test]
    fn the_system_roots_are_read_once_and_a_ca_file_each_time() {
        let first = root_store(&Roots::System).expect("the system's trusted roots");
        let again = root_store(&Roots::System).expect("the system's trusted roots");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!first.is_empty());
        // A CA file (Debian's bundle, copied), then the same path holding no certificate.
        let file = std::env::temp_dir().join(format!("catchall-roots-{}.pem", std::process::id()));
        std::fs::copy("/etc/ssl/certs/ca-certificates.crt", &file).expect("copy the CA bundle");
        let read = root_store(&Roots::File(file.clone())).expect("the copied bundle");
        assert!(!read.is_empty());
        std::fs::write(&file, "renewed, but not a certificate").expect("write");
        let error = root_store(&Roots::File(file.clone())).unwrap_err();
        std::fs::remove_file(&file).expect("remove");
        assert!(error.to_string().contains("catchall-roots"), "{error}");
    }
}
