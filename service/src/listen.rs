//! Where the server listens, and serving the API there with reflection and
//! health. A Unix socket (mode 0600) is the default; TCP is for loopback
//! unless TLS with client certificates is configured.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use proto::v1::hv_probe_server::HvProbeServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::server::HvProbeService;

/// A listening address: `unix:PATH` (or a bare path) or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    /// `$XDG_RUNTIME_DIR/hvprobe.sock`, else `/run/hvprobe/hvprobe.sock`.
    pub fn default_unix() -> Listen {
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        Listen::Unix(match dir {
            Some(d) => d.join("hvprobe.sock"),
            None => PathBuf::from("/run/hvprobe/hvprobe.sock"),
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Why a listen address or TLS setup is refused.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("bad listen address '{text}': {why} (expected unix:PATH or tcp:HOST:PORT)")]
    BadAddress { text: String, why: String },
    #[error("refusing to listen on non-loopback {addr} without TLS client authentication: pass --tls-cert, --tls-key and --tls-client-ca, or listen on 127.0.0.1/::1 or a Unix socket")]
    NonLoopbackWithoutTls { addr: SocketAddr },
    #[error("TLS needs a certificate, a key and a client CA; missing {0}")]
    IncompleteTls(&'static str),
    #[error("TLS is only for TCP listeners; {0} is a Unix socket (protected by its file mode)")]
    TlsOnUnix(PathBuf),
    #[error("cannot read {what} {path}: {cause}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket {0} is in use by a running server")]
    InUse(PathBuf),
    #[error("cannot listen on {addr}: {cause}")]
    Bind { addr: String, cause: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

impl FromStr for Listen {
    type Err = ListenError;
    fn from_str(s: &str) -> Result<Self, ListenError> {
        let bad = |why: &str| ListenError::BadAddress {
            text: s.to_string(),
            why: why.to_string(),
        };
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse::<SocketAddr>().map(Listen::Tcp).map_err(|e| {
                bad(&format!(
                    "{e} (use an IP address, e.g. tcp:127.0.0.1:50051)"
                ))
            });
        }
        if s.starts_with('/') || s.starts_with('.') {
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        Err(bad("unknown scheme"))
    }
}

/// PEM files for TLS with client certificates.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.client_ca.is_none()
    }

    fn config(&self) -> Result<ServerTlsConfig, ListenError> {
        let need = |p: &Option<PathBuf>, what: &'static str| {
            p.clone().ok_or(ListenError::IncompleteTls(what))
        };
        let (cert, key, ca) = (
            need(&self.cert, "--tls-cert")?,
            need(&self.key, "--tls-key")?,
            need(&self.client_ca, "--tls-client-ca")?,
        );
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|cause| ListenError::ReadFile {
                what,
                path: path.to_path_buf(),
                cause,
            })
        };
        let (cert_pem, key_pem, ca_pem) = (
            read("certificate", &cert)?,
            read("key", &key)?,
            read("client CA", &ca)?,
        );
        validate_tls(&cert_pem, &cert, &key_pem, &key, &ca_pem, &ca)?;
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert_pem, key_pem))
            .client_ca_root(Certificate::from_pem(ca_pem));
        // What serving will do with it, done now: nothing is bound with a
        // TLS setup that cannot accept a connection.
        Server::builder()
            .tls_config(config.clone())
            .map_err(|e| ListenError::Tls(tls_error_text(&e)))?;
        Ok(config)
    }
}

/// `e` and its causes on one line.
fn tls_error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Checks the PEM files as the TLS server will use them, naming the file at
/// fault: a certificate chain, a private key that belongs to its first
/// certificate, and client CA certificates a verifier accepts.
fn validate_tls(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
    ca_pem: &[u8],
    ca_path: &Path,
) -> Result<(), ListenError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;

    let bad = |path: &Path, what: &str| ListenError::Tls(format!("{}: {what}", path.display()));
    let certs = |pem: &[u8], path: &Path, what: &str| {
        let v = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(path, &format!("not a PEM {what}: {e}")))?;
        if v.is_empty() {
            return Err(bad(
                path,
                &format!("no PEM certificate in it (expected {what})"),
            ));
        }
        Ok(v)
    };
    let chain = certs(cert_pem, cert_path, "certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| bad(key_path, &format!("no usable PEM private key: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, ca_path, "client CA certificate")? {
        roots
            .add(c)
            .map_err(|e| bad(ca_path, &format!("not a usable CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| bad(ca_path, &format!("cannot verify clients with it: {e}")))?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ListenError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            ListenError::Tls(format!(
                "{} does not go with {}: {e}",
                key_path.display(),
                cert_path.display()
            ))
        })?;
    Ok(())
}

/// Checks an address against the TLS setup before anything is bound.
pub fn check(listen: &Listen, tls: &TlsFiles) -> Result<Option<ServerTlsConfig>, ListenError> {
    match listen {
        Listen::Unix(p) if !tls.is_empty() => Err(ListenError::TlsOnUnix(p.clone())),
        Listen::Unix(_) => Ok(None),
        Listen::Tcp(a) if tls.is_empty() => {
            if a.ip().is_loopback() {
                Ok(None)
            } else {
                Err(ListenError::NonLoopbackWithoutTls { addr: *a })
            }
        }
        Listen::Tcp(_) => tls.config().map(Some),
    }
}

enum Socket {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A bound listener, ready to serve.
pub struct Bound {
    socket: Socket,
    tls: Option<ServerTlsConfig>,
}

impl Bound {
    /// The address actually bound (a TCP port 0 becomes the real port).
    pub fn local(&self) -> Listen {
        match &self.socket {
            Socket::Unix(_, p) => Listen::Unix(p.clone()),
            Socket::Tcp(l) => Listen::Tcp(l.local_addr().expect("bound TCP socket has an address")),
        }
    }

    /// Serves `service` plus reflection (v1, v1alpha) and grpc.health.v1
    /// until `shutdown` completes. The Unix socket file is removed at the end.
    pub async fn serve(
        self,
        service: HvProbeService,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<HvProbeServer<HvProbeService>>()
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = reflection()
            .build_v1()
            .expect("the API's descriptor set is valid (checked by proto's tests)");
        let v1alpha = reflection()
            .build_v1alpha()
            .expect("the API's descriptor set is valid (checked by proto's tests)");
        let mut builder = Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let router = builder
            .add_service(HvProbeServer::new(service))
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha);
        match self.socket {
            Socket::Unix(l, path) => {
                let r = router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                    .await;
                let _ = std::fs::remove_file(&path);
                r
            }
            Socket::Tcp(l) => {
                router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(l), shutdown)
                    .await
            }
        }
    }
}

/// Binds `listen` after checking it against `tls` (see [`check`]).
pub async fn bind(listen: &Listen, tls: &TlsFiles) -> Result<Bound, ListenError> {
    let tls_config = check(listen, tls)?;
    let socket = match listen {
        Listen::Unix(path) => Socket::Unix(bind_unix(path).await?, path.clone()),
        Listen::Tcp(addr) => {
            Socket::Tcp(
                TcpListener::bind(addr)
                    .await
                    .map_err(|cause| ListenError::Bind {
                        addr: addr.to_string(),
                        cause,
                    })?,
            )
        }
    };
    Ok(Bound {
        socket,
        tls: tls_config,
    })
}

async fn bind_unix(path: &Path) -> Result<UnixListener, ListenError> {
    let err = |cause| ListenError::Bind {
        addr: path.display().to_string(),
        cause,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.to_path_buf()));
        }
        // A socket left by a server that died can go; a live one cannot.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ListenError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    // Only the owner may connect: the socket gives full control of probes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_addresses() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            "/tmp/y".parse::<Listen>().unwrap(),
            Listen::Unix("/tmp/y".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:5".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:5".parse().unwrap())
        );
        let e = "tcp:localhost:5".parse::<Listen>().unwrap_err().to_string();
        assert!(e.contains("tcp:localhost:5"), "{e}");
        assert!("http://x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
    }

    #[test]
    fn non_loopback_tcp_needs_tls_with_client_ca() {
        let any: Listen = "tcp:0.0.0.0:50051".parse().unwrap();
        let e = check(&any, &TlsFiles::default()).unwrap_err();
        assert!(
            matches!(e, ListenError::NonLoopbackWithoutTls { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("--tls-client-ca"));
        let v6: Listen = "tcp:[::]:1".parse().unwrap();
        assert!(check(&v6, &TlsFiles::default()).is_err());
        // Half a TLS setup is refused too.
        let half = TlsFiles {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            client_ca: None,
        };
        assert!(matches!(
            check(&any, &half),
            Err(ListenError::IncompleteTls("--tls-client-ca"))
        ));
        let lo: Listen = "tcp:127.0.0.1:0".parse().unwrap();
        assert!(check(&lo, &TlsFiles::default()).unwrap().is_none());
        let lo6: Listen = "tcp:[::1]:0".parse().unwrap();
        assert!(check(&lo6, &TlsFiles::default()).unwrap().is_none());
        assert!(matches!(
            check(&Listen::Unix("/x".into()), &half),
            Err(ListenError::TlsOnUnix(_))
        ));
    }

    /// PEM files made at test time: a CA, a server certificate and key
    /// from it, and a key that is not the certificate's.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
            let dir = tempfile::tempdir().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            let w = |n: &str, t: &str| std::fs::write(dir.path().join(n), t).unwrap();
            w("ca.pem", &ca.pem());
            w("cert.pem", &cert.pem());
            w("key.pem", &key.serialize_pem());
            w("other.key", &KeyPair::generate().unwrap().serialize_pem());
            w("empty", "");
            w(
                "junk",
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            );
            Files { dir }
        }

        fn tls(&self, cert: &str, key: &str, ca: &str) -> TlsFiles {
            let p = |n: &str| {
                Some(if n.starts_with('/') {
                    n.into()
                } else {
                    self.dir.path().join(n)
                })
            };
            TlsFiles {
                cert: p(cert),
                key: p(key),
                client_ca: p(ca),
            }
        }
    }

    #[test]
    fn unusable_tls_files_are_refused_before_binding() {
        let f = Files::new();
        let any: Listen = "tcp:0.0.0.0:50051".parse().unwrap();
        assert!(check(&any, &f.tls("cert.pem", "key.pem", "ca.pem"))
            .unwrap()
            .is_some());
        let refused = |cert: &str, key: &str, ca: &str, needle: &str| {
            let e = check(&any, &f.tls(cert, key, ca))
                .expect_err(needle)
                .to_string();
            assert!(e.contains(needle), "{cert} {key} {ca}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        };
        // /dev/null (and so an empty file) as each of the three.
        refused(
            "/dev/null",
            "key.pem",
            "ca.pem",
            "/dev/null: no PEM certificate",
        );
        refused(
            "cert.pem",
            "/dev/null",
            "ca.pem",
            "/dev/null: no usable PEM private key",
        );
        refused(
            "cert.pem",
            "key.pem",
            "/dev/null",
            "/dev/null: no PEM certificate",
        );
        refused("empty", "key.pem", "ca.pem", "empty: no PEM certificate");
        // A key that does not belong to the certificate.
        refused(
            "cert.pem",
            "other.key",
            "ca.pem",
            "other.key does not go with",
        );
        // A certificate as the key, a key as the certificate.
        refused(
            "cert.pem",
            "cert.pem",
            "ca.pem",
            "cert.pem: no usable PEM private key",
        );
        refused(
            "key.pem",
            "key.pem",
            "ca.pem",
            "key.pem: no PEM certificate",
        );
        // PEM armour around bytes that are no certificate.
        refused(
            "cert.pem",
            "key.pem",
            "junk",
            "junk: not a usable CA certificate",
        );
    }

    #[tokio::test]
    async fn unix_socket_is_owner_only_and_stale_sockets_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/hv.sock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        let e = bind(&Listen::Unix(path.clone()), &TlsFiles::default())
            .await
            .err()
            .expect("regular file kept");
        assert!(matches!(e, ListenError::NotASocket(_)), "{e}");
        std::fs::remove_file(&path).unwrap();
        // A stale socket (no server behind it) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let b = bind(&Listen::Unix(path.clone()), &TlsFiles::default())
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server on the live socket is refused.
        let e = bind(&Listen::Unix(path.clone()), &TlsFiles::default())
            .await
            .err()
            .expect("in use");
        assert!(matches!(e, ListenError::InUse(_)), "{e}");
        drop(b);
    }
}
