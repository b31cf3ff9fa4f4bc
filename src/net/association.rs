//! Associations over plain TCP or TLS, one type for each role: [`ServerAssociation`]
//! (accepted by an SCP: the node's listener, the mining job's C-MOVE destination) and
//! [`ClientAssociation`] (opened by an SCU: the forwarder, the mining SCU). dicom-ul
//! negotiates; which stream it runs on is decided here and nowhere else.

use std::net::SocketAddr;

use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::association::server::{AccessControl, Negotiation, ServerAssociationOptions};
use dicom_ul::association::{Association, AsyncClientAssociation, AsyncServerAssociation};
use dicom_ul::pdu::PresentationContextNegotiated;
use dicom_ul::Pdu;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::tls::{ClientCertSlot, ClientTls, ServerTls};

type Result<T> = std::result::Result<T, dicom_ul::association::Error>;
type ServerTlsStream = tokio_rustls::server::TlsStream<TcpStream>;
type ClientTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Run the same expression on either variant.
macro_rules! each {
    ($value:expr, $a:ident => $body:expr) => {
        match $value {
            Self::Plain($a) => $body,
            Self::Tls($a) => $body,
        }
    };
}

/// An association accepted by an SCP.
// One per association, never in a collection: the TLS variant's size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ServerAssociation {
    Plain(AsyncServerAssociation<TcpStream>),
    Tls(AsyncServerAssociation<ServerTlsStream>),
}

impl ServerAssociation {
    pub fn peer_ae_title(&self) -> &str {
        each!(self, a => a.peer_ae_title())
    }

    pub fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        each!(self, a => a.presentation_contexts())
    }

    pub fn requestor_max_pdu_length(&self) -> u32 {
        each!(self, a => a.requestor_max_pdu_length())
    }

    pub async fn send(&mut self, pdu: &Pdu) -> Result<()> {
        each!(self, a => a.send(pdu).await)
    }

    pub async fn receive(&mut self) -> Result<Pdu> {
        each!(self, a => a.receive().await)
    }

    pub async fn abort(self) -> Result<()> {
        each!(self, a => a.abort().await)
    }
}

/// How a connection to an SCP port is secured: nothing, or this server's TLS.
#[derive(Clone, Copy)]
pub enum Transport<'a> {
    Plain,
    Tls(&'a ServerTls),
}

/// A connection accepted on a port, before negotiation.
pub struct Incoming {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    /// Set by the TLS handshake when the client sent a certificate it accepted.
    pub client_cert: ClientCertSlot,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Incoming {
    /// Prepare `socket` for `transport`; for TLS this takes the certificate loaded last.
    pub fn new(
        socket: TcpStream,
        peer: SocketAddr,
        transport: Transport<'_>,
    ) -> std::result::Result<Incoming, super::tls::TlsError> {
        let (tls, client_cert) = match transport {
            Transport::Plain => (None, ClientCertSlot::default()),
            Transport::Tls(server) => {
                let (config, slot) = server.for_connection()?;
                (Some(config), slot)
            }
        };
        Ok(Incoming {
            socket,
            peer,
            client_cert,
            tls,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Handshake (TLS) and negotiate. The access control of `options` may read
    /// [`Incoming::client_cert`]: the handshake has filled it by the time it is asked.
    pub async fn accept<A, N>(
        self,
        options: ServerAssociationOptions<'_, A, N>,
    ) -> Result<ServerAssociation>
    where
        A: AccessControl,
        N: Negotiation,
    {
        match self.tls {
            None => options
                .establish_async(self.socket)
                .await
                .map(ServerAssociation::Plain),
            Some(config) => options
                .tls_config(config)
                .establish_tls_async(self.socket)
                .await
                .map(ServerAssociation::Tls),
        }
    }

    /// Handshake only (TLS), for a connection that is answered without dicom-ul's
    /// negotiation (the A-ASSOCIATE-RJ of a full listener).
    pub async fn into_stream(self) -> std::io::Result<Stream> {
        match self.tls {
            None => Ok(Stream::Plain(self.socket)),
            Some(config) => tokio_rustls::TlsAcceptor::from(config)
                .accept(self.socket)
                .await
                .map(|s| Stream::Tls(Box::new(s))),
        }
    }
}

/// A raw connection, TCP or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<ServerTlsStream>),
}

impl Stream {
    pub async fn read_pdu(&mut self, max_pdu_length: u32) -> Result<Pdu> {
        let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
        // Strict: a PDU announcing more than `max_pdu_length` is refused from its header.
        each!(self, s => dicom_ul::association::read_pdu_from_wire_async(s, &mut buf, max_pdu_length, true).await)
    }

    pub async fn write_all_and_close(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        each!(self, s => {
            s.write_all(bytes).await?;
            s.shutdown().await
        })
    }
}

/// An association opened by an SCU.
#[allow(clippy::large_enum_variant)]
pub enum ClientAssociation {
    Plain(AsyncClientAssociation<TcpStream>),
    Tls(AsyncClientAssociation<ClientTlsStream>),
}

impl ClientAssociation {
    /// Connect to `host:port` (TLS when `tls` is given) and negotiate `options`.
    pub async fn connect(
        options: ClientAssociationOptions<'_>,
        host: &str,
        port: u16,
        tls: Option<&ClientTls>,
    ) -> Result<ClientAssociation> {
        let mut association = match tls {
            None => options
                .establish_async((host, port))
                .await
                .map(ClientAssociation::Plain)?,
            Some(tls) => options
                .tls_config(tls.config.clone())
                .server_name(&tls.server_name)
                .establish_tls_async((host, port))
                .await
                .map(ClientAssociation::Tls)?,
        };
        // Negotiation is one write and one read; from here on every message counts.
        if let Err(e) = association.tcp().set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on the association");
        }
        Ok(association)
    }

    fn tcp(&mut self) -> &TcpStream {
        match self {
            Self::Plain(a) => a.inner_stream(),
            Self::Tls(a) => a.inner_stream().get_ref().0,
        }
    }

    pub fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        each!(self, a => a.presentation_contexts())
    }

    pub fn acceptor_max_pdu_length(&self) -> u32 {
        each!(self, a => a.acceptor_max_pdu_length())
    }

    pub async fn send(&mut self, pdu: &Pdu) -> Result<()> {
        each!(self, a => a.send(pdu).await)
    }

    pub async fn receive(&mut self) -> Result<Pdu> {
        each!(self, a => a.receive().await)
    }

    /// Bytes already encoded as PDUs, written as they are (the forwarder's batched
    /// P-DATA-TF), and flushed: TLS buffers records until it is.
    pub async fn write_encoded(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        each!(self, a => {
            let stream = a.inner_stream();
            stream.write_all(bytes).await?;
            stream.flush().await
        })
    }

    pub async fn release(self) -> Result<()> {
        each!(self, a => a.release().await)
    }

    pub async fn abort(self) -> Result<()> {
        each!(self, a => a.abort().await)
    }
}
