//! TLS for the LISTEN connection ([`super::listener`], tokio-postgres), with the same `sslmode`
//! meaning as libpq and the query pool (sqlx), so one URL configures both.
//!
//! The URL's `sslmode` and `sslrootcert` are read here (tokio-postgres knows neither `verify-*` nor
//! `sslrootcert`): `disable` → plain TCP; `prefer` (the default) and `require` → TLS without
//! certificate verification, as libpq does; `verify-ca` and `verify-full` → TLS verified against
//! `sslrootcert` (for RDS: the RDS CA bundle) or else the Mozilla roots, host name included.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A parsed LISTEN connection target.
pub(crate) struct ListenTarget {
    /// The tokio-postgres configuration (with the TLS mode it understands).
    pub(crate) config: tokio_postgres::Config,
    /// The TLS connector.
    pub(crate) tls: MakeRustlsConnect,
}

/// Parses `url` into a tokio-postgres configuration and a TLS connector.
pub(crate) fn listen_target(url: &str) -> anyhow::Result<ListenTarget> {
    let mut parsed = reqwest::Url::parse(url)?;
    let mut sslmode = String::from("prefer");
    let mut rootcert = None;
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter_map(|(k, v)| match &*k {
            "sslmode" => {
                sslmode = v.into_owned();
                None
            }
            "sslrootcert" => {
                rootcert = Some(v.into_owned());
                None
            }
            _ => Some((k.into_owned(), v.into_owned())),
        })
        .collect();
    parsed.set_query(None);
    if !kept.is_empty() {
        parsed.query_pairs_mut().extend_pairs(kept);
    }
    let mut config: tokio_postgres::Config = parsed.as_str().parse()?;
    if config.get_application_name().is_none() {
        config.application_name(super::APPLICATION_NAME);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let (mode, client) = match sslmode.as_str() {
        "disable" | "allow" => (SslMode::Disable, None),
        "prefer" | "require" => (
            if sslmode == "require" {
                SslMode::Require
            } else {
                SslMode::Prefer
            },
            Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                    .with_no_client_auth(),
            ),
        ),
        "verify-ca" | "verify-full" => {
            let mut roots = RootCertStore::empty();
            match &rootcert {
                Some(path) => {
                    for cert in CertificateDer::pem_file_iter(path)? {
                        roots.add(cert?)?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            (
                SslMode::Require,
                Some(builder.with_root_certificates(roots).with_no_client_auth()),
            )
        }
        other => anyhow::bail!("unsupported sslmode {other:?}"),
    };
    config.ssl_mode(mode);
    let client = match client {
        Some(c) => c,
        None => {
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    Ok(ListenTarget {
        config,
        tls: MakeRustlsConnect::new(client),
    })
}

/// Encryption without authentication of the server: libpq's `prefer` and `require`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_rootcert_are_taken_out_of_the_url() {
        let t = listen_target(
            "postgres://u:p@db.example:5433/app?sslmode=require&application_name=relay",
        )
        .unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.config.get_dbname(), Some("app"));
        assert_eq!(t.config.get_application_name(), Some("relay"));
        let t = listen_target("postgres://u@h/app?sslmode=disable").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        let t = listen_target("postgres://u@h/app?sslmode=verify-full").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert!(
            listen_target("postgres://u@h/app?sslmode=verify-full&sslrootcert=/nonexistent.pem")
                .is_err()
        );
        assert!(listen_target("postgres://u@h/app?sslmode=bogus").is_err());
    }
}
