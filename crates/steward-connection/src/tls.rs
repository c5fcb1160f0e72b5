//! TLS to PostgreSQL with rustls, following libpq's `sslmode`:
//! `disable` and `prefer` (the default) connect without TLS; `require` encrypts but does not
//! verify the server (libpq's meaning, for servers without a known CA); `verify-ca` verifies the
//! certificate chain; `verify-full` also the host name. `sslrootcert=<file>` names the CA
//! certificates (PEM); without it the system's trust store is used.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    SignatureScheme,
};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("unknown sslmode {0:?}: use disable, prefer, require, verify-ca or verify-full")]
    UnknownMode(String),
    #[error("cannot read sslrootcert {path}: {reason}")]
    RootCert { path: String, reason: String },
    #[error("no CA certificates: the system trust store is empty; set sslrootcert")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// How Steward's connections to one server do TLS.
#[derive(Clone)]
pub(crate) struct Tls {
    mode: SslMode,
    connector: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

impl Tls {
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    pub(crate) fn connector(&self) -> Option<&MakeRustlsConnect> {
        self.connector.as_ref()
    }

    /// The TLS settings a database URL asks for.
    pub fn from_params(params: &TlsParams) -> Result<Self, TlsSetupError> {
        let config = match params.mode {
            SslMode::Disable | SslMode::Prefer => {
                return Ok(Self {
                    mode: params.mode,
                    connector: None,
                })
            }
            SslMode::Require => ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(load_roots(params.root_cert.as_ref())?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
                let builder = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
                if params.mode == SslMode::VerifyCa {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                        .with_no_client_auth()
                } else {
                    builder.with_webpki_verifier(webpki).with_no_client_auth()
                }
            }
        };
        Ok(Self {
            mode: params.mode,
            connector: Some(MakeRustlsConnect::new(config)),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(path: Option<&PathBuf>) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    match path {
        Some(path) => {
            let err = |reason: String| TlsSetupError::RootCert {
                path: path.display().to_string(),
                reason,
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
                roots
                    .add(cert.map_err(|e| err(e.to_string()))?)
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A malformed system certificate is skipped, as libpq and browsers do.
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots);
    }
    Ok(roots)
}

/// The TLS parameters of a URL (`sslmode`, `sslrootcert`), and the URL rewritten for
/// tokio-postgres, which knows neither `verify-*` modes nor `sslrootcert`.
pub(crate) struct TlsParams {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub rewritten: String,
}

impl TlsParams {
    pub fn parse(url: &str) -> Result<Self, TlsSetupError> {
        let mut mode = SslMode::default();
        let mut root_cert = None;
        let mut keep = |key: &str, value: &str| -> Result<Option<String>, TlsSetupError> {
            match key {
                "sslmode" => {
                    mode = SslMode::parse(value)
                        .ok_or_else(|| TlsSetupError::UnknownMode(value.to_owned()))?;
                    // tokio-postgres enforces TLS for `require`; verification is ours.
                    Ok(Some(
                        match mode {
                            SslMode::VerifyCa | SslMode::VerifyFull => "require",
                            SslMode::Prefer => "prefer",
                            _ => value,
                        }
                        .to_owned(),
                    ))
                }
                "sslrootcert" => {
                    root_cert = Some(PathBuf::from(value));
                    Ok(None)
                }
                _ => Ok(Some(value.to_owned())),
            }
        };
        let rewritten = if url.contains("://") {
            match url.split_once('?') {
                None => url.to_owned(),
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if let Some(v) = keep(k, v)? {
                            kept.push(format!("{k}={v}"));
                        }
                    }
                    if kept.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for pair in url.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if let Some(v) = keep(k, v)? {
                    kept.push(format!("{k}={v}"));
                }
            }
            kept.join(" ")
        };
        Ok(Self {
            mode,
            root_cert,
            rewritten,
        })
    }
}

/// `sslmode=require`: encryption without authentication of the server, as libpq does it.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(CertificateError::NotValidForName))
            | Err(TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rewrites_urls() {
        let p = TlsParams::parse(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            p.rewritten,
            "postgres://u@h/db?sslmode=require&application_name=x"
        );
        let p = TlsParams::parse("host=h sslmode=verify-ca sslrootcert=/ca.pem user=u").unwrap();
        assert_eq!(
            (p.mode, p.rewritten.as_str()),
            (SslMode::VerifyCa, "host=h sslmode=require user=u")
        );
        let p = TlsParams::parse("postgres://u@h/db").unwrap();
        assert_eq!(
            (p.mode, p.rewritten.as_str()),
            (SslMode::Prefer, "postgres://u@h/db")
        );
        assert!(matches!(
            TlsParams::parse("postgres://h/db?sslmode=sometimes"),
            Err(TlsSetupError::UnknownMode(_))
        ));
    }

    fn tls(url: &str) -> Result<Tls, TlsSetupError> {
        Tls::from_params(&TlsParams::parse(url)?)
    }

    #[test]
    fn a_missing_root_certificate_file_is_a_clear_error() {
        let err = tls("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .expect_err("a missing sslrootcert is refused");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn modes_build_connectors() {
        assert!(tls("postgres://h/db?sslmode=disable")
            .unwrap()
            .connector()
            .is_none());
        assert!(tls("postgres://h/db").unwrap().connector().is_none());
        assert!(tls("postgres://h/db?sslmode=require")
            .unwrap()
            .connector()
            .is_some());
    }
}
