//! Connecting a client to a server's [`Listen`] address (the CLI, tests).

use hyper_util::rt::TokioIo;
use proto::v1::hv_probe_client::HvProbeClient;
use tonic::transport::{Channel, Endpoint};

use crate::listen::Listen;

/// Largest message a client accepts: event batches can be large.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Connects to the server at `listen` (Unix socket or plain TCP).
pub async fn connect(listen: &Listen) -> Result<HvProbeClient<Channel>, tonic::transport::Error> {
    connect_with(listen, |e| e).await
}

/// Like [`connect`], with the endpoint adjusted first (e.g. HTTP/2 window
/// sizes).
pub async fn connect_with(
    listen: &Listen,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<HvProbeClient<Channel>, tonic::transport::Error> {
    let channel = match listen {
        Listen::Tcp(addr) => {
            configure(Endpoint::from_shared(format!("http://{addr}"))?)
                .connect()
                .await?
        }
        Listen::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector dials the socket.
            configure(Endpoint::from_static("http://localhost"))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await?
        }
    };
    Ok(HvProbeClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}
