//! Certificates made at test time (rcgen): a CA, a server certificate for
//! `localhost`/127.0.0.1, a client certificate from the CA, and one from
//! another CA, written as PEM files in a temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A key that is not the server certificate's.
    pub other_key: PathBuf,
    pub client_cert: String,
    pub client_key: String,
    pub ca_pem: String,
    /// A client certificate and key issued by another CA.
    pub foreign_cert: String,
    pub foreign_key: String,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    eku: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, sans[0]);
    p.extended_key_usages = vec![eku];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("hvprobe test CA");
        let other = new_ca("another CA");
        let (sc, sk) = leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (cc, ck) = leaf(&ca, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        let (fc, fk) = leaf(&other, &["intruder"], ExtendedKeyUsagePurpose::ClientAuth);
        let other_key = KeyPair::generate().unwrap().serialize_pem();
        Pki {
            ca: write(dir.path(), "ca.pem", &ca.pem()),
            server_cert: write(dir.path(), "server.pem", &sc),
            server_key: write(dir.path(), "server.key", &sk),
            other_key: write(dir.path(), "other.key", &other_key),
            client_cert: cc,
            client_key: ck,
            ca_pem: ca.pem(),
            foreign_cert: fc,
            foreign_key: fk,
            dir,
        }
    }

    /// An empty regular file (what `/dev/null` reads as).
    pub fn empty(&self) -> PathBuf {
        write(self.dir.path(), "empty.pem", "")
    }

    pub fn server_files(&self) -> service::TlsFiles {
        service::TlsFiles {
            cert: Some(self.server_cert.clone()),
            key: Some(self.server_key.clone()),
            client_ca: Some(self.ca.clone()),
        }
    }
}
