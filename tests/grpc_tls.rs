//! Mutual TLS on a TCP listener with certificates made at test time
//! (rcgen): a client with a certificate from the configured CA gets
//! answers; one without a certificate, one with a certificate from another
//! CA and a plaintext one are refused.

mod grpc_harness;
#[path = "common/pki.rs"]
mod pki;

use std::time::Duration;

use grpc_harness::*;
use proto::v1::{self, hv_probe_client::HvProbeClient};
use service::Listen;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A GetGuestInfo call over TLS with `identity` (cert, key PEM) if any.
async fn call(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<v1::GetGuestInfoResponse, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    let ep = Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e}"))?;
    let channel = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    HvProbeClient::new(channel)
        .get_guest_info(v1::GetGuestInfoRequest::default())
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("call: {s:?}"))
}

#[test]
fn mutual_tls_admits_only_clients_of_the_configured_ca() {
    if !kvm_available() {
        return;
    }
    let pki = pki::Pki::generate();
    let h = Harness::start(service::ServiceConfig::default());
    let bound =
        h.rt.block_on(service::listen::bind(
            &"tcp:127.0.0.1:0".parse().unwrap(),
            &pki.server_files(),
        ))
        .expect("good TLS files are accepted");
    let Listen::Tcp(addr) = bound.local() else {
        panic!("not TCP")
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = h.rt.spawn(bound.serve(h.service.clone(), async {
        let _ = stopped.await;
    }));
    h.rt.block_on(async {
        let ok = call(addr, &pki.ca_pem, Some((&pki.client_cert, &pki.client_key)))
            .await
            .expect("a client of the CA is served");
        assert_eq!(ok.vcpus, 2);
        let e = call(addr, &pki.ca_pem, None)
            .await
            .expect_err("no client certificate");
        assert!(!e.is_empty());
        let e = call(
            addr,
            &pki.ca_pem,
            Some((&pki.foreign_cert, &pki.foreign_key)),
        )
        .await
        .expect_err("a client certificate from another CA");
        assert!(!e.is_empty());
        // Plaintext HTTP/2 to the TLS port.
        let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", addr.port()))
            .unwrap()
            .timeout(Duration::from_secs(5));
        let r = match plain.connect().await {
            Ok(ch) => HvProbeClient::new(ch)
                .get_guest_info(v1::GetGuestInfoRequest::default())
                .await
                .map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(format!("connect: {e}"))),
        };
        assert!(r.is_err(), "plaintext client was served");
        // The good client still works after the refusals.
        call(addr, &pki.ca_pem, Some((&pki.client_cert, &pki.client_key)))
            .await
            .expect("served again");
    });
    let _ = stop.send(());
    h.rt.block_on(server).unwrap().unwrap();
    assert!(h.alive());
}
