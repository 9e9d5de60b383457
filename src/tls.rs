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
