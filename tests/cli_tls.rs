//! `hvprobe run` with TLS files it cannot use (issue 14, item 5): empty
//! files (what /dev/null reads as), a key that is not the certificate's,
//! PEM that is no certificate. Each must stop the start with a one-line
//! error naming the file and a non-zero exit, before "serving" is printed;
//! good files (made at test time with rcgen) serve mutual TLS.

#[path = "common/mod.rs"]
mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_tls(cert: &Path, key: &Path, ca: &Path, serial: &Path) -> std::process::Child {
    let k = test_guest::kernel_path().to_str().unwrap().to_string();
    Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args(["run", "--kernel", &k, "--cmdline"])
        .arg(test_guest::cmdline(None, None, true))
        .arg("--serial")
        .arg(serial)
        .args(["--listen", "tcp:127.0.0.1:0", "--tls-cert"])
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .arg("--tls-client-ca")
        .arg(ca)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hvprobe")
}

/// Exit code and stderr of a run that must end by itself within 20 s.
fn refused(cert: &Path, key: &Path, ca: &Path, serial: &Path) -> (i32, String) {
    use std::io::Read;
    let mut child = run_tls(cert, key, ca, serial);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("hvprobe still running after 20 s with unusable TLS files: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

#[test]
fn unusable_tls_files_fail_the_start_and_good_ones_serve() {
    if !common::kvm_available() {
        return;
    }
    let pki = pki::Pki::generate();
    let serial = pki.dir.path().join("serial.txt");
    let empty = pki.empty();
    let junk = pki.dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (c, k, ca) = (&pki.server_cert, &pki.server_key, &pki.ca);
    let cases: [(&Path, &Path, &Path, String); 6] = [
        (
            &empty,
            k,
            ca,
            format!("{}: no PEM certificate", empty.display()),
        ),
        (
            c,
            &empty,
            ca,
            format!("{}: no usable PEM private key", empty.display()),
        ),
        (
            c,
            k,
            &empty,
            format!("{}: no PEM certificate", empty.display()),
        ),
        (
            c,
            &pki.other_key,
            ca,
            format!(
                "{} does not go with {}",
                pki.other_key.display(),
                c.display()
            ),
        ),
        (k, k, ca, format!("{}: no PEM certificate", k.display())),
        (
            c,
            k,
            &junk,
            format!("{}: not a usable CA certificate", junk.display()),
        ),
    ];
    for (cert, key, ca, needle) in &cases {
        let (code, err) = refused(cert, key, ca, &serial);
        assert_ne!(code, 0, "{needle}: exit 0: {err}");
        assert!(!err.contains("serving"), "{needle}: served anyway: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{needle}: expected one line: {err}");
        assert!(lines[0].starts_with("hvprobe: error: "), "{err}");
        assert!(
            lines[0].contains(needle.as_str()),
            "expected {needle:?} in {err}"
        );
    }

    // The good files: it says where it serves, and a client of the CA gets
    // an answer there.
    let mut child = run_tls(c, k, ca, &serial);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let l = lines.next().expect("hvprobe ended before serving").unwrap();
        if let Some(a) = l.strip_prefix("hvprobe: serving hvprobe.v1 on tcp:") {
            break a.parse::<std::net::SocketAddr>().unwrap();
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let info = rt.block_on(async {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .identity(Identity::from_pem(&pki.client_cert, &pki.client_key))
            .domain_name("localhost");
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("TLS connect");
        proto::v1::hv_probe_client::HvProbeClient::new(ch)
            .get_guest_info(proto::v1::GetGuestInfoRequest::default())
            .await
    });
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_eq!(info.expect("mTLS call").into_inner().vcpus, 2);
}
