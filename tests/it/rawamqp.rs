//! A minimal AMQP 0-9-1 publisher written frame by frame over a TcpStream, so tests can send
//! what a client library would refuse to build: short strings that are not UTF-8 in any
//! property, header keys of every kind, every field type RabbitMQ accepts.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

/// Bytes of one AMQP field table or value, built by hand.
#[derive(Debug, Default, Clone)]
pub struct Table(Vec<u8>);

impl Table {
    /// Adds `key` (any bytes) with a value already encoded as type letter + payload.
    pub fn field(mut self, key: &[u8], value: &[u8]) -> Self {
        short_string(&mut self.0, key);
        self.0.extend_from_slice(value);
        self
    }

    /// The table as it goes on the wire (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = (self.0.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&self.0);
        out
    }

    /// This table as a value of type `F` (a nested table).
    pub fn as_value(&self) -> Vec<u8> {
        let mut out = vec![b'F'];
        out.extend(self.encode());
        out
    }
}

/// A value: type letter then payload.
pub fn value(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(payload);
    out
}

/// A long-string (`S`) or byte-array (`x`) value: type letter, u32 length, bytes.
pub fn long_value(kind: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend((bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// An array (`A`) of encoded values.
pub fn array(values: &[Vec<u8>]) -> Vec<u8> {
    let inner: Vec<u8> = values.concat();
    let mut out = vec![b'A'];
    out.extend((inner.len() as u32).to_be_bytes());
    out.extend(inner);
    out
}

fn short_string(out: &mut Vec<u8>, bytes: &[u8]) {
    assert!(bytes.len() <= 255, "a short string holds at most 255 bytes");
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

fn long_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The basic-class content properties, each as raw bytes (`None`: absent).
#[derive(Debug, Default, Clone)]
pub struct Properties {
    pub content_type: Option<Vec<u8>>,
    pub content_encoding: Option<Vec<u8>>,
    pub headers: Option<Table>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<Vec<u8>>,
    pub reply_to: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
    pub timestamp: Option<u64>,
    pub kind: Option<Vec<u8>>,
    pub app_id: Option<Vec<u8>>,
}

impl Properties {
    fn encode(&self) -> (u16, Vec<u8>) {
        let mut flags = 0u16;
        let mut out = Vec::new();
        let short = |bit: u16, v: &Option<Vec<u8>>, flags: &mut u16, out: &mut Vec<u8>| {
            if let Some(v) = v {
                *flags |= 1 << bit;
                short_string(out, v);
            }
        };
        short(15, &self.content_type, &mut flags, &mut out);
        short(14, &self.content_encoding, &mut flags, &mut out);
        if let Some(headers) = &self.headers {
            flags |= 1 << 13;
            out.extend(headers.encode());
        }
        if let Some(mode) = self.delivery_mode {
            flags |= 1 << 12;
            out.push(mode);
        }
        if let Some(priority) = self.priority {
            flags |= 1 << 11;
            out.push(priority);
        }
        short(10, &self.correlation_id, &mut flags, &mut out);
        short(9, &self.reply_to, &mut flags, &mut out);
        // bit 8: expiration (RabbitMQ requires a number there; left out)
        short(7, &self.message_id, &mut flags, &mut out);
        if let Some(timestamp) = self.timestamp {
            flags |= 1 << 6;
            out.extend(timestamp.to_be_bytes());
        }
        short(5, &self.kind, &mut flags, &mut out);
        // bit 4: user-id (RabbitMQ requires the authenticated user's name; left out)
        short(3, &self.app_id, &mut flags, &mut out);
        (flags, out)
    }
}

/// One connection with one channel in confirm mode, as guest/guest on 127.0.0.1:5672.
pub struct RawPublisher {
    stream: TcpStream,
    frame_max: u32,
}

impl RawPublisher {
    pub async fn connect() -> Self {
        let stream = TcpStream::connect("127.0.0.1:5672")
            .await
            .expect("RabbitMQ must answer at 127.0.0.1:5672");
        let mut this = Self {
            stream,
            frame_max: 131_072,
        };
        this.stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("send the protocol header");
        this.expect_method(0, 10, 10).await; // connection.start
        let mut start_ok = Vec::new();
        start_ok.extend(Table::default().encode()); // client-properties
        short_string(&mut start_ok, b"PLAIN");
        long_string(&mut start_ok, b"\0guest\0guest");
        short_string(&mut start_ok, b"en_US");
        this.send_method(0, 10, 11, &start_ok).await;
        let tune = this.expect_method(0, 10, 30).await; // connection.tune
        let channel_max = u16::from_be_bytes([tune[0], tune[1]]);
        let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
        if frame_max != 0 {
            this.frame_max = this.frame_max.min(frame_max);
        }
        let mut tune_ok = channel_max.to_be_bytes().to_vec();
        tune_ok.extend(this.frame_max.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats
        this.send_method(0, 10, 31, &tune_ok).await;
        let mut open = Vec::new();
        short_string(&mut open, b"/");
        short_string(&mut open, b"");
        open.push(0);
        this.send_method(0, 10, 40, &open).await;
        this.expect_method(0, 10, 41).await; // connection.open-ok
        this.send_method(1, 20, 10, &[0]).await; // channel.open
        this.expect_method(1, 20, 11).await;
        this.send_method(1, 85, 10, &[0]).await; // confirm.select
        this.expect_method(1, 85, 11).await;
        this
    }

    /// Publishes `body` with `properties` and waits for the broker's confirm (panics on a
    /// nack or a closed channel: the test meant the broker to accept the message).
    pub async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &[u8],
        properties: &Properties,
        body: &[u8],
    ) {
        let mut publish = 0u16.to_be_bytes().to_vec();
        short_string(&mut publish, exchange.as_bytes());
        short_string(&mut publish, routing_key);
        publish.push(0); // not mandatory, not immediate
        self.send_method(1, 60, 40, &publish).await;
        let (flags, props) = properties.encode();
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend(flags.to_be_bytes());
        header.extend(props);
        self.send_frame(FRAME_HEADER, 1, &header).await;
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            self.send_frame(FRAME_BODY, 1, part).await;
        }
        let (class, method, _) = self.read_method(1).await;
        assert_eq!(
            (class, method),
            (60, 80),
            "the broker confirms the message (basic.ack), not {class}.{method}"
        );
    }

    pub async fn close(mut self) {
        let mut close = 200u16.to_be_bytes().to_vec();
        short_string(&mut close, b"bye");
        close.extend([0, 0, 0, 0]);
        self.send_method(0, 10, 50, &close).await;
        let _ = self.expect_method(0, 10, 51).await;
    }

    async fn send_method(&mut self, channel: u16, class: u16, method: u16, args: &[u8]) {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend(method.to_be_bytes());
        payload.extend_from_slice(args);
        self.send_frame(FRAME_METHOD, channel, &payload).await;
    }

    async fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream.write_all(&frame).await.expect("send a frame");
    }

    /// The next method frame on `channel` (heartbeats skipped): class, method, arguments.
    async fn read_method(&mut self, channel: u16) -> (u16, u16, Vec<u8>) {
        loop {
            let mut head = [0u8; 7];
            self.stream
                .read_exact(&mut head)
                .await
                .expect("the broker keeps the connection open");
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream
                .read_exact(&mut payload)
                .await
                .expect("read a frame");
            assert_eq!(payload.pop(), Some(FRAME_END), "frame end");
            if head[0] == FRAME_HEARTBEAT {
                continue;
            }
            let got_channel = u16::from_be_bytes([head[1], head[2]]);
            assert_eq!(head[0], FRAME_METHOD, "a method frame");
            let class = u16::from_be_bytes([payload[0], payload[1]]);
            let method = u16::from_be_bytes([payload[2], payload[3]]);
            assert!(
                !matches!((class, method), (10, 50) | (20, 40)),
                "the broker closed the {}: {}",
                if class == 10 { "connection" } else { "channel" },
                String::from_utf8_lossy(&payload[4..])
            );
            assert_eq!(got_channel, channel, "a method on channel {channel}");
            return (class, method, payload[4..].to_vec());
        }
    }

    async fn expect_method(&mut self, channel: u16, class: u16, method: u16) -> Vec<u8> {
        let (got_class, got_method, args) = self.read_method(channel).await;
        assert_eq!(
            (got_class, got_method),
            (class, method),
            "expected method {class}.{method}"
        );
        args
    }
}
