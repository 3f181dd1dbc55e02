//! Postgres connection settings as libpq reads them, TLS included.
//!
//! tokio-postgres parses `sslmode` only up to `require` and knows no `sslrootcert`, `sslcert` or
//! `sslkey`. [`config`] takes those out of the URL (or `key=value` string), hands the rest to
//! tokio-postgres, and builds the rustls connector that does what libpq would:
//!
//! | `sslmode` | TLS | server certificate checked |
//! |---|---|---|
//! | `disable` | never | – |
//! | `allow`, `prefer` (default) | if the server offers it, except over loopback (unless `sslcert`, `sslrootcert` or `channel_binding=require`) | no; the chain if `sslrootcert` is set |
//! | `require` | always | no; the chain if `sslrootcert` is set |
//! | `verify-ca` | always | the chain |
//! | `verify-full` | always | the chain and the host name |
//!
//! Roots: `sslrootcert=FILE`, `sslrootcert=system` (which means `verify-full`, as in libpq 16),
//! else `~/.postgresql/root.crt` when it exists, else the system roots (for `verify-full` only:
//! `verify-ca` without a root file is an error, as in libpq). `sslcert` + `sslkey` present a
//! client certificate.

use crate::tls::{self, Identity, Roots, Verify};
use std::path::PathBuf;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Errors in a Postgres URL or its TLS files. The URL itself (which may hold a password) is
/// never part of the message.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid sslmode {0:?} (disable, allow, prefer, require, verify-ca or verify-full)")]
    SslMode(String),
    #[error("sslcert and sslkey go together")]
    HalfIdentity,
    #[error(
        "sslrootcert=system needs sslmode=verify-full (or no sslmode), as in libpq 16: with \
         sslmode={0} any publicly trusted certificate, for any name, would pass"
    )]
    SystemRootsNeedVerifyFull(String),
    #[error(
        "sslmode=verify-ca needs sslrootcert (the CA that signed the server's certificate) or \
         ~/.postgresql/root.crt, as in libpq; for a certificate from a public CA use \
         sslmode=verify-full&sslrootcert=system"
    )]
    VerifyCaWithoutRoot,
    #[error("invalid Postgres connection string: {0}")]
    Parse(#[source] tokio_postgres::Error),
    #[error("Postgres TLS settings")]
    Tls(#[from] tls::TlsError),
}

/// The TLS parameters libpq reads and tokio-postgres does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

const OURS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The TLS connector of a Postgres URL: rustls as [`config`] set it up, built again from its
/// files (`sslrootcert`, `sslcert`, `sslkey`) when they change ([`tls::Reloading`]), so a
/// renewed client certificate or CA file is used from the next connection on.
#[derive(Clone)]
pub struct PgTls(std::sync::Arc<tls::Reloading<MakeRustlsConnect>>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PgTls
where
    MakeRustlsConnect: tokio_postgres::tls::MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        self.0.current("Postgres").make_tls_connect(domain)
    }
}

/// Parses a libpq URL or `key=value` string: the tokio-postgres configuration and the TLS
/// connector for it.
pub fn config(url: &str) -> Result<(tokio_postgres::Config, PgTls), PgError> {
    let (rest, params) = split_tls_params(url);
    let mut config: tokio_postgres::Config = rest.parse().map_err(PgError::Parse)?;
    // libpq 16: `sslrootcert=system` means `verify-full`, and a weaker mode with it is an error.
    let system_roots = params.sslrootcert.as_deref() == Some("system");
    let mode = match params.sslmode.as_deref() {
        None if system_roots => "verify-full",
        Some(mode) if system_roots && mode != "verify-full" => {
            return Err(PgError::SystemRootsNeedVerifyFull(mode.to_string()));
        }
        mode => mode.unwrap_or("prefer"),
    };
    let root_file = default_root_file();
    let root_given = params.sslrootcert.is_some();
    let (ssl_mode, verify) = match mode {
        "disable" => (SslMode::Disable, Verify::None),
        "allow" | "prefer" if root_given => (SslMode::Prefer, Verify::ChainOnly),
        "allow" | "prefer" => (SslMode::Prefer, Verify::None),
        // As libpq: `require` with a root file (given, or ~/.postgresql/root.crt) checks the chain.
        "require" if root_given || root_file.is_some() => (SslMode::Require, Verify::ChainOnly),
        "require" => (SslMode::Require, Verify::None),
        // (Over a Unix-domain socket no mode uses TLS, so no root file is needed there.)
        "verify-ca" if !root_given && root_file.is_none() && !only_unix_sockets(&config) => {
            return Err(PgError::VerifyCaWithoutRoot);
        }
        "verify-ca" => (SslMode::Require, Verify::ChainOnly),
        "verify-full" => (SslMode::Require, Verify::Full),
        other => return Err(PgError::SslMode(other.to_string())),
    };
    // `prefer` over loopback: plain, as encryption there protects nothing and costs a handshake
    // and a copy per message (and `prefer` verifies nothing anyway). `require` and up still
    // encrypt over loopback.
    // libpq ignores `sslmode` on Unix-domain sockets (a Cloud SQL proxy's `host=/cloudsql/…`
    // with `sslmode=require` connects); tokio-postgres would ask the server for TLS there, be
    // refused, and fail.
    // A client certificate is how the client logs in (`cert` authentication): it goes over
    // TLS whatever the host, as libpq's `prefer` does (dropped over loopback, the server
    // refused the login: "no pg_hba.conf entry … no encryption").
    // Neither when a root certificate or channel binding asks for TLS: loopback may be a tunnel
    // (`ssh -L`, `kubectl port-forward`) to a server elsewhere, as libpq's `prefer` assumes.
    let plain_loopback = ssl_mode == SslMode::Prefer
        && only_loopback(&config)
        && params.sslcert.is_none()
        && params.sslrootcert.is_none()
        && config.get_channel_binding() != tokio_postgres::config::ChannelBinding::Require;
    let ssl_mode = if only_unix_sockets(&config) || plain_loopback {
        SslMode::Disable
    } else {
        ssl_mode
    };
    config.ssl_mode(ssl_mode);
    let roots = match params.sslrootcert.as_deref() {
        Some("system") => Roots::System,
        Some(path) => Roots::File(PathBuf::from(path)),
        None => root_file.map_or(Roots::System, Roots::File),
    };
    let identity = match (&params.sslcert, &params.sslkey) {
        (Some(cert), Some(key)) if ssl_mode != SslMode::Disable => {
            Some((PathBuf::from(cert), PathBuf::from(key)))
        }
        (Some(_), None) | (None, Some(_)) => return Err(PgError::HalfIdentity),
        _ => None,
    };
    let mut files: Vec<PathBuf> = identity
        .iter()
        .flat_map(|(cert, key)| [cert.clone(), key.clone()])
        .collect();
    if let Roots::File(path) = &roots
        && verify != Verify::None
    {
        files.push(path.clone());
    }
    let build = move || {
        let identity = match &identity {
            Some((cert, key)) => Some(Identity::from_files(cert, key)?),
            None => None,
        };
        let mut client = tls::client_config(&roots, verify, identity)?;
        // Postgres 17 refuses a direct TLS connection (`sslnegotiation=direct`) without this
        // ALPN, which libpq 17 always sends; servers before 17 ignore it.
        client.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustlsConnect::new(client))
    };
    let tls = tls::Reloading::new(files, build)?;
    Ok((config, PgTls(std::sync::Arc::new(tls))))
}

/// `host:port/database` of a connection string, for messages: never the password.
pub fn describe(url: &str) -> String {
    let (rest, _) = split_tls_params(url);
    let Ok(config) = rest.parse::<tokio_postgres::Config>() else {
        return "<unparsable Postgres URL>".into();
    };
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

/// Whether every host of `config` is a Unix-domain socket.
fn only_unix_sockets(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    // A `hostaddr` makes tokio-postgres connect over TCP to it, whatever `host` says.
    !hosts.is_empty()
        && config.get_hostaddrs().is_empty()
        && hosts
            .iter()
            .all(|host| matches!(host, tokio_postgres::config::Host::Unix(_)))
}

/// Whether every host of `config` is this machine: a Unix socket, `localhost` or a loopback
/// address; with `hostaddr`, every address given there, which is what is connected to (judged by
/// `host` alone, `host=localhost hostaddr=10.0.0.5` went in plain text to 10.0.0.5).
fn only_loopback(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    let addrs = config.get_hostaddrs();
    if !addrs.is_empty() {
        return addrs.iter().all(|addr| addr.is_loopback());
    }
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|host| match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        })
}

/// libpq's default root certificate file, when it exists.
fn default_root_file() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

/// Takes libpq's TLS parameters out of a connection string, leaving the rest as it was.
pub fn split_tls_params(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut take = |key: &str, value: String| -> bool {
        let slot = match key {
            "sslmode" => &mut params.sslmode,
            "sslrootcert" => &mut params.sslrootcert,
            "sslcert" => &mut params.sslcert,
            "sslkey" => &mut params.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some(start) = query_start(url) else {
            return (url.to_string(), params);
        };
        let (base, query) = (&url[..start], &url[start + 1..]);
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                // Percent-decoded as libpq and tokio-postgres do: a `+` stays a `+` (form
                // decoding read `/etc/ssl/db+ca.pem` as `/etc/ssl/db ca.pem`).
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let decode = |text: &str| {
                    percent_encoding::percent_decode_str(text)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                match decode(key) {
                    key if OURS.contains(&key.as_str()) => !take(&key, decode(value)),
                    _ => !pair.is_empty(),
                }
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, params)
    } else {
        let mut kept = Vec::new();
        for (key, value, raw) in key_values(url) {
            if !(OURS.contains(&key.as_str()) && take(&key, value)) {
                kept.push(raw);
            }
        }
        (kept.join(" "), params)
    }
}

/// Where the query of a Postgres URL starts (its `?`), found as tokio-postgres finds it: after
/// the credentials, which run to the first `@`. Taken from the first `?`, a `?` in the password
/// (`u:Zq?9vT@db/app?sslmode=require`) hid the `sslmode`, and `require` became `prefer`.
fn query_start(url: &str) -> Option<usize> {
    let authority = url.find("://")? + 3;
    let host = url[authority..]
        .find('@')
        .map_or(authority, |at| authority + at + 1);
    url[host..].find('?').map(|at| host + at)
}

/// The `key = value` pairs of a libpq keyword string, each with its raw text (values may be
/// single-quoted, with `\'` and `\\` escapes). What does not parse is kept raw, for
/// tokio-postgres to report.
fn key_values(text: &str) -> Vec<(String, String, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i == chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '=' {
            i += 1;
        }
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        let raw: String = chars[start..i.min(chars.len())].iter().collect();
        pairs.push((key, value, raw));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_tls_params_out_of_a_url() {
        let (rest, params) = split_tls_params(
            "postgres://u:p%40ss@db.example.com:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example.com:5433/app?application_name=x"
        );
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, _) = split_tls_params("postgresql://h/db?sslmode=disable");
        assert_eq!(rest, "postgresql://h/db");
        // A `?` in the password: the query is the one after the host, as tokio-postgres reads
        // it (the `sslmode=require` was missed, and `prefer` overrode tokio-postgres' `require`).
        let url = "postgres://catchall:Zq?9vT@db.example.com/catchall?sslmode=require";
        let (rest, params) = split_tls_params(url);
        assert_eq!(rest, "postgres://catchall:Zq?9vT@db.example.com/catchall");
        assert_eq!(params.sslmode.as_deref(), Some("require"));
        assert_eq!(config(url).unwrap().0.get_ssl_mode(), SslMode::Require);
        // Percent-decoded only, as libpq: a `+` in a path stays a `+`.
        let (_, params) = split_tls_params("postgres://h/db?sslrootcert=/etc/ssl/db+ca%20x.pem");
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/ssl/db+ca x.pem"));
    }

    #[test]
    fn takes_tls_params_out_of_key_values() {
        let (rest, params) = split_tls_params(
            "host=localhost sslmode = verify-ca sslrootcert='/my dir/ca.pem' user=postgres",
        );
        assert_eq!(rest, "host=localhost user=postgres");
        assert_eq!(params.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/my dir/ca.pem"));
        assert!(config(&rest).is_ok());
    }

    #[test]
    fn describes_without_password() {
        assert_eq!(
            describe("postgres://u:secret@db:5435/app?sslmode=require"),
            "db:5435/app"
        );
    }

    #[test]
    fn modes_map_like_libpq() {
        let mode = |url: &str| config(url).map(|(c, _)| c.get_ssl_mode());
        assert_eq!(mode("postgres://h/db").unwrap(), SslMode::Prefer);
        assert_eq!(mode("postgres://127.0.0.1/db").unwrap(), SslMode::Disable);
        assert_eq!(
            mode("postgres://localhost/db?sslmode=prefer").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://localhost/db?sslmode=require").unwrap(),
            SslMode::Require
        );
        // Loopback that asks for TLS (a tunnel to a server elsewhere): `prefer` tries it.
        // (Debian's bundle of the public roots stands for a CA file here.)
        for tunnel in [
            "postgres://localhost/db?channel_binding=require",
            "postgres://127.0.0.1/db?sslrootcert=/etc/ssl/certs/ca-certificates.crt",
        ] {
            assert_eq!(
                config(tunnel).map(|(c, _)| c.get_ssl_mode()).ok(),
                Some(SslMode::Prefer),
                "{tunnel}"
            );
        }
        assert_eq!(
            mode("postgres://h/db?sslmode=disable").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=require").unwrap(),
            SslMode::Require
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=verify-full&sslrootcert=system").unwrap(),
            SslMode::Require
        );
        let error = mode("postgres://h/db?sslmode=bogus").unwrap_err();
        assert!(error.to_string().contains("bogus"), "{error}");
        let error =
            mode("postgres://h/db?sslmode=verify-full&sslrootcert=/nope/ca.pem").unwrap_err();
        assert!(
            format!("{:#}", anyhow::Error::new(error)).contains("/nope/ca.pem"),
            "names the file"
        );
        assert!(matches!(
            mode("postgres://h/db?sslcert=/c.pem"),
            Err(PgError::HalfIdentity)
        ));
        // A Unix-domain socket: no TLS, whatever sslmode says (as libpq).
        for url in [
            "postgres:///db?host=/var/run/postgresql&sslmode=require",
            "host=/tmp dbname=db sslmode=verify-full",
            // verify-ca needs a root file only where TLS is used.
            "postgres:///db?host=/cloudsql/p:r:db&sslmode=verify-ca",
        ] {
            assert_eq!(mode(url).unwrap(), SslMode::Disable, "{url}");
        }
        // With a hostaddr the connection is TCP to it: sslmode counts again, and whether it is
        // loopback is the address's (`prefer` went in plain text to 10.0.0.5 before).
        assert_eq!(
            mode("host=/tmp hostaddr=10.0.0.5 dbname=db sslmode=require").unwrap(),
            SslMode::Require
        );
        for remote in [
            "host=localhost hostaddr=10.0.0.5 dbname=db",
            "host=/tmp hostaddr=10.0.0.5 dbname=db",
        ] {
            assert_eq!(mode(remote).unwrap(), SslMode::Prefer, "{remote}");
        }
        assert_eq!(
            mode("host=db.example.com hostaddr=127.0.0.1 dbname=db").unwrap(),
            SslMode::Disable
        );
        // sslrootcert=system: verify-full, and nothing weaker (libpq 16).
        assert_eq!(
            mode("postgres://h/db?sslrootcert=system").unwrap(),
            SslMode::Require
        );
        for weaker in ["prefer", "require", "verify-ca", "disable"] {
            let url = format!("postgres://h/db?sslmode={weaker}&sslrootcert=system");
            assert!(
                matches!(mode(&url), Err(PgError::SystemRootsNeedVerifyFull(m)) if m == weaker),
                "{weaker}"
            );
        }
        // verify-ca checks a chain up to a CA the operator named: without one it is an error
        // (it used to check against every public root, with no name check: any public certificate).
        // With ~/.postgresql/root.crt (libpq's default root file) it checks against that.
        let verify_ca = mode("postgres://h/db?sslmode=verify-ca");
        match default_root_file() {
            None => assert!(
                matches!(verify_ca, Err(PgError::VerifyCaWithoutRoot)),
                "{verify_ca:?}"
            ),
            Some(_) => assert_eq!(verify_ca.unwrap(), SslMode::Require),
        }
    }
}
