//! TLS to PostgreSQL with libpq's `sslmode` meanings, for the regular connections
//! (tokio-postgres) and the replication client alike:
//!
//! - `disable`: plain TCP;
//! - `allow`, `prefer` (the default, as in libpq): TLS when the server offers it, its
//!   certificate not checked;
//! - `require`: TLS or no connection; the certificate is checked only when `sslrootcert`
//!   names a CA file (then it means `verify-ca`, as in libpq);
//! - `verify-ca`: TLS with a certificate chain ending at `sslrootcert` (default: the
//!   system's CAs);
//! - `verify-full`: `verify-ca`, and the certificate must name the host connected to.
//!
//! Unix-domain sockets never use TLS.

use std::path::PathBuf;
use std::pin::Pin;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS part of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

impl Default for Tls {
    fn default() -> Self {
        Tls { mode: SslMode::Prefer, root_cert: None }
    }
}

impl Tls {
    /// From the values of `sslmode` and `sslrootcert`.
    pub fn new(mode: Option<&str>, root_cert: Option<&str>) -> Result<Tls, String> {
        let mode = match mode.unwrap_or("prefer") {
            "disable" => SslMode::Disable,
            "allow" | "prefer" | "" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!("invalid sslmode {other:?} (disable, allow, prefer, require, verify-ca or verify-full)"))
            }
        };
        let root_cert = root_cert.filter(|p| !p.is_empty()).map(PathBuf::from);
        if let Some(path) = &root_cert {
            if !path.is_file() {
                return Err(format!("sslrootcert {} is not a readable file", path.display()));
            }
        }
        Ok(Tls { mode, root_cert })
    }

    /// Whether the server's certificate chain is checked.
    pub fn verifies(&self) -> bool {
        matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull)
            || (self.mode == SslMode::Require && self.root_cert.is_some())
    }

    /// The OpenSSL connector for these settings (host names are checked per connection).
    pub fn connector(&self) -> Result<SslConnector, openssl::error::ErrorStack> {
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        if let Some(path) = &self.root_cert {
            builder.set_ca_file(path)?;
        }
        if !self.verifies() {
            builder.set_verify(SslVerifyMode::NONE);
        }
        Ok(builder.build())
    }

    /// Runs the TLS handshake on a connection whose server accepted an SSLRequest.
    pub async fn handshake(&self, host: &str, tcp: TcpStream) -> std::io::Result<SslStream<TcpStream>> {
        let mut config = self.connector().map_err(std::io::Error::other)?.configure().map_err(std::io::Error::other)?;
        config.set_verify_hostname(self.mode == SslMode::VerifyFull);
        let ssl = config.into_ssl(host).map_err(std::io::Error::other)?;
        let mut stream = SslStream::new(ssl, tcp).map_err(std::io::Error::other)?;
        Pin::new(&mut stream).connect().await.map_err(|e| {
            let detail = e.ssl_error().map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, format!("TLS handshake with {host} failed: {detail}"))
        })?;
        Ok(stream)
    }
}

/// Splits `sslmode` and `sslrootcert` off a connection string (key=value pairs or a URL):
/// returns key=value pairs for tokio-postgres, whose own `sslmode` knows only disable,
/// prefer and require, and the TLS settings.
pub fn split_conninfo(conninfo: &str) -> Result<(String, Tls), String> {
    let pairs = crate::capture::replication::conninfo::parse_pairs(conninfo).map_err(|e| e.to_string())?;
    let (mut mode, mut root_cert) = (None, None);
    let mut rest = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root_cert = Some(value),
            _ => rest.push(format!("{key}={}", quote_value(&value))),
        }
    }
    let tls = Tls::new(mode.as_deref(), root_cert.as_deref())?;
    rest.push(format!(
        "sslmode={}",
        if tls.mode == SslMode::Disable {
            "disable"
        } else if tls.mode == SslMode::Prefer {
            "prefer"
        } else {
            "require"
        }
    ));
    Ok((rest.join(" "), tls))
}

/// A libpq key=value value, quoted.
fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_the_rest_of_the_connection_string() {
        let (rest, tls) = split_conninfo("host=db port=5433 user=a password='x y' sslmode=verify-full").unwrap();
        assert_eq!(rest, "host='db' port='5433' user='a' password='x y' sslmode=require");
        assert_eq!(tls, Tls { mode: SslMode::VerifyFull, root_cert: None });
        assert!(tls.verifies());
        let (rest, tls) = split_conninfo("postgres://u:p%27q@h:1/d?sslmode=disable").unwrap();
        assert_eq!(rest, "user='u' password='p\\'q' host='h' port='1' dbname='d' sslmode=disable");
        assert_eq!(tls.mode, SslMode::Disable);
        let (_, tls) = split_conninfo("host=h").unwrap();
        assert_eq!(tls, Tls::default());
        assert!(!tls.verifies());
    }

    #[test]
    fn bad_settings_are_explained() {
        assert!(split_conninfo("host=h sslmode=sometimes").unwrap_err().contains("invalid sslmode"));
        assert!(split_conninfo("host=h sslmode=require sslrootcert=/no/such/ca.pem")
            .unwrap_err()
            .contains("not a readable file"));
    }
}
