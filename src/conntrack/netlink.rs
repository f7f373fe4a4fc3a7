//! The real [`ConntrackTable`]: ctnetlink requests over a `NETLINK_NETFILTER` socket.
//!
//! Message types come from `netlink-packet-netfilter` (its `conntrack` module has the
//! get/delete messages and the tuple attributes); the few attributes it lacks (`CTA_ID`,
//! `CTA_ZONE`, `CTA_FILTER`) are built as raw attributes here. No process is spawned and no C
//! library is linked.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    DefaultNla, Emitable, ErrorBuffer, NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

use super::{ConntrackError, ConntrackTable, Flow};
use crate::model::IpFamily;

/// `CTA_ID`: the entry's id (big-endian u32), dumped and checked by deletes.
const CTA_ID: u16 = 12;
/// `CTA_ZONE`: the entry's zone (big-endian u16), present in dumps when not 0.
const CTA_ZONE: u16 = 18;
/// `CTA_FILTER` (Linux 5.9+): nested attribute that makes the kernel filter a dump.
const CTA_FILTER: u16 = 25;
/// `CTA_FILTER_ORIG_FLAGS`: which fields of the `CTA_TUPLE_ORIG` in the request must match.
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// `CTA_FILTER_F_CTA_PROTO_NUM`: filter on the L4 protocol number.
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;

/// `MSG_TRUNC` (the same value on every Linux architecture): makes `recv` return the real
/// datagram length, so a truncated read is detected instead of silently parsed.
const MSG_TRUNC: i32 = 0x20;
const ENOENT: i32 = 2;

/// Receive buffer: the kernel sizes dump datagrams to the reader's buffer, up to 32 KiB.
const RECV_BUFFER: usize = 64 * 1024;
/// Socket receive buffer asked for (the kernel caps it at `net.core.rmem_max`).
const SOCKET_RCVBUF: usize = 4 * 1024 * 1024;
/// Deletes per `sendmsg`: every one is acknowledged in its own datagram, and a batch's acks
/// must fit the socket receive buffer even at the default `rmem_max` (~1 KiB each).
const DELETE_BATCH: usize = 64;

/// ctnetlink on a netlink socket of the network namespace the calling thread was in when
/// [`NetlinkConntrack::new`] ran.
///
/// A netlink socket belongs to the namespace it was created in for its whole life, so a
/// proxy (or a test) that works on another namespace creates this from a thread that has
/// entered it; nothing here changes namespace. Needs `CAP_NET_ADMIN` in that namespace.
pub struct NetlinkConntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// The kernel accepts `CTA_FILTER` (cleared, once, when it rejects the filter).
    kernel_filter: bool,
}

impl std::fmt::Debug for NetlinkConntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkConntrack")
            .field("seq", &self.seq)
            .field("kernel_filter", &self.kernel_filter)
            .finish_non_exhaustive()
    }
}

fn io_error(context: &'static str) -> impl FnOnce(io::Error) -> ConntrackError {
    move |source| ConntrackError::Io { context, source }
}

fn family_of(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// `io::Error` is not `Clone`; one socket error fails every delete of a batch.
fn copy_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// The kernel's answer to one request, decoded from an `NLMSG_ERROR` message.
fn ack_result(op: &'static str, code: Option<std::num::NonZeroI32>) -> Result<(), ConntrackError> {
    match code.map(|c| -c.get()) {
        None => Ok(()),
        Some(ENOENT) => Err(ConntrackError::NotFound),
        Some(errno) => Err(ConntrackError::Kernel {
            op,
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

impl NetlinkConntrack {
    /// Opens a ctnetlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io_error("open"))?;
        socket.bind_auto().map_err(io_error("bind"))?;
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(io_error("connect"))?;
        // Best effort: large tables dump faster with fewer, larger reads; error acks need not
        // echo the request back.
        let _ = socket.set_rx_buf_sz(SOCKET_RCVBUF);
        let _ = socket.set_cap_ack(true);
        Ok(NetlinkConntrack {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
            kernel_filter: true,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Appends one ctnetlink request to `out`.
    fn encode(
        out: &mut Vec<u8>,
        seq: u32,
        flags: u16,
        family: IpFamily,
        message: ConntrackMessage,
    ) {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family_of(family), 0, 0),
                message,
            )),
        );
        packet.finalize();
        let start = out.len();
        out.resize(start + packet.buffer_len(), 0);
        packet.serialize(&mut out[start..]);
    }

    /// Reads one datagram into `self.buf`; returns its length.
    fn recv(&mut self) -> Result<usize, ConntrackError> {
        let n = self
            .socket
            .recv(&mut &mut self.buf[..], MSG_TRUNC)
            .map_err(io_error("receive"))?;
        if n > self.buf.len() {
            return Err(ConntrackError::Decode(format!(
                "datagram of {n} bytes truncated to {}",
                self.buf.len()
            )));
        }
        Ok(n)
    }

    /// One dump of `family`, asking the kernel to filter on `protocol` when `filtered`;
    /// only flows of `protocol` are returned either way.
    fn dump_once(
        &mut self,
        family: IpFamily,
        protocol: u8,
        filtered: bool,
    ) -> Result<Vec<Flow>, ConntrackError> {
        let seq = self.next_seq();
        let out = dump_request(seq, family, filtered.then_some(protocol));
        self.socket.send(&out, 0).map_err(io_error("send dump"))?;

        let mut flows = Vec::new();
        let mut received = 0usize;
        let mut undecodable = 0usize;
        let mut done = false;
        while !done {
            let n = self.recv()?;
            for_each_message(&self.buf[..n], |message| {
                if done || message.seq != seq {
                    // Left over from an earlier, abandoned request.
                    return Ok(());
                }
                match message.message_type {
                    NLMSG_DONE => done = true,
                    NLMSG_ERROR => {
                        let code = ErrorBuffer::new_checked(message.payload)
                            .map_err(|e| ConntrackError::Decode(e.to_string()))?
                            .code();
                        ack_result("dump", code)?;
                    }
                    _ => {
                        received += 1;
                        match parse_flow(message.bytes) {
                            Some(flow) if flow.protocol == protocol && flow.family() == family => {
                                flows.push(flow)
                            }
                            Some(_) => {}
                            None => undecodable += 1,
                        }
                    }
                }
                Ok(())
            })?;
        }
        if undecodable > 0 {
            tracing::warn!(
                ?family,
                protocol,
                undecodable,
                "skipped undecodable conntrack entries"
            );
        }
        tracing::debug!(
            ?family,
            protocol,
            received,
            kept = flows.len(),
            "dumped conntrack entries"
        );
        Ok(flows)
    }

    /// Sends the deletes of `flows` in one `sendmsg` and collects one ack per delete.
    fn delete_batch(&mut self, flows: &[Flow]) -> Vec<Result<(), ConntrackError>> {
        let first_seq = self.seq.wrapping_add(1);
        let mut request = Vec::with_capacity(flows.len() * 96);
        for flow in flows {
            let seq = self.next_seq();
            Self::encode(
                &mut request,
                seq,
                NLM_F_REQUEST | NLM_F_ACK,
                flow.family(),
                delete_message(flow),
            );
        }
        let mut results: Vec<Option<Result<(), ConntrackError>>> =
            flows.iter().map(|_| None).collect();
        if let Err(e) = self.socket.send(&request, 0) {
            return flows
                .iter()
                .map(|_| {
                    Err(ConntrackError::Io {
                        context: "send delete",
                        source: copy_io_error(&e),
                    })
                })
                .collect();
        }
        // The kernel handles every message of the datagram before `send` returns, so all the
        // acks are queued now; a missing one means the receive buffer overflowed.
        let mut pending = flows.len();
        while pending > 0 {
            let n = match self.recv() {
                Ok(n) => n,
                Err(e) => {
                    let source = match &e {
                        ConntrackError::Io { source, .. } => copy_io_error(source),
                        other => io::Error::other(other.to_string()),
                    };
                    for slot in results.iter_mut().filter(|r| r.is_none()) {
                        *slot = Some(Err(ConntrackError::Io {
                            context: "receive delete ack",
                            source: copy_io_error(&source),
                        }));
                    }
                    break;
                }
            };
            for_each_message(&self.buf[..n], |message| {
                if message.message_type != NLMSG_ERROR {
                    return Ok(());
                }
                let index = message.seq.wrapping_sub(first_seq) as usize;
                if let Some(slot @ None) = results.get_mut(index) {
                    let code = ErrorBuffer::new_checked(message.payload)
                        .map_err(|e| ConntrackError::Decode(e.to_string()))?
                        .code();
                    *slot = Some(ack_result("delete", code));
                    pending -= 1;
                }
                Ok(())
            })
            .unwrap_or_else(|e| tracing::warn!(error = %e, "bad conntrack delete ack"));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ConntrackError::Decode("no ack for delete".into()))))
            .collect()
    }
}

/// One netlink message of a received datagram.
struct RawMessage<'a> {
    message_type: u16,
    seq: u32,
    /// The whole message, header included.
    bytes: &'a [u8],
    /// The message after its 16-byte header.
    payload: &'a [u8],
}

/// Calls `f` with every netlink message in one datagram.
fn for_each_message(
    data: &[u8],
    mut f: impl FnMut(RawMessage<'_>) -> Result<(), ConntrackError>,
) -> Result<(), ConntrackError> {
    let mut offset = 0;
    while offset < data.len() {
        let buffer = NetlinkBuffer::new_checked(&data[offset..])
            .map_err(|e| ConntrackError::Decode(e.to_string()))?;
        let len = buffer.length() as usize;
        f(RawMessage {
            message_type: buffer.message_type(),
            seq: buffer.sequence_number(),
            bytes: &data[offset..offset + len],
            payload: buffer.payload(),
        })?;
        offset += (len + 3) & !3;
    }
    Ok(())
}

impl ConntrackTable for NetlinkConntrack {
    /// One `IPCTNL_MSG_CT_GET` dump of `family`, filtered by the kernel to `protocol`
    /// (`CTA_FILTER`, Linux 5.9+). Older kernels ignore the filter; a kernel that rejects it
    /// gets unfiltered dumps from then on. Either way the flows are also filtered here.
    fn dump(&mut self, family: IpFamily, protocol: u8) -> Result<Vec<Flow>, ConntrackError> {
        if self.kernel_filter {
            match self.dump_once(family, protocol, true) {
                Err(ConntrackError::Kernel { source, .. })
                    // EINVAL or EOPNOTSUPP
                    if matches!(
                        source.kind(),
                        io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                    ) =>
                {
                    tracing::info!(
                        error = %source,
                        "kernel rejects conntrack dump filters; dumping unfiltered"
                    );
                    self.kernel_filter = false;
                }
                other => return other,
            }
        }
        self.dump_once(family, protocol, false)
    }

    fn delete(&mut self, flow: &Flow) -> Result<(), ConntrackError> {
        self.delete_batch(std::slice::from_ref(flow))
            .pop()
            .unwrap_or(Err(ConntrackError::Decode("no ack for delete".into())))
    }

    /// Batches 64 deletes per `sendmsg`: one syscall and one kernel entry per
    /// batch instead of per flow.
    fn delete_all(&mut self, flows: &[Flow]) -> Vec<Result<(), ConntrackError>> {
        let mut results = Vec::with_capacity(flows.len());
        for chunk in flows.chunks(DELETE_BATCH) {
            results.extend(self.delete_batch(chunk));
        }
        results
    }
}

/// `IPCTNL_MSG_CT_GET` dump request for `family`, with a kernel-side filter on `protocol`
/// when given.
///
/// The crate builds the message and its `CTA_TUPLE_ORIG`; `CTA_FILTER` is appended by hand
/// because the kernel parses it strictly (it must carry `NLA_F_NESTED`, which the crate's raw
/// attribute type cannot set).
fn dump_request(seq: u32, family: IpFamily, protocol: Option<u8>) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut out = Vec::with_capacity(64);
    let Some(protocol) = protocol else {
        NetlinkConntrack::encode(&mut out, seq, flags, family, ConntrackMessage::Get(vec![]));
        return out;
    };
    let request =
        ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(vec![Tuple::Proto(
            vec![ProtoTuple::Protocol(protocol.into())],
        )])]);
    NetlinkConntrack::encode(&mut out, seq, flags, family, request);
    // CTA_FILTER { CTA_FILTER_ORIG_FLAGS: u32 (host order) }
    let inner = DefaultNla::new(
        CTA_FILTER_ORIG_FLAGS,
        CTA_FILTER_F_CTA_PROTO_NUM.to_ne_bytes().to_vec(),
    );
    let inner_len = inner.buffer_len();
    let outer_len = 4 + inner_len;
    out.extend_from_slice(&(outer_len as u16).to_ne_bytes());
    out.extend_from_slice(&(CTA_FILTER | NLA_F_NESTED).to_ne_bytes());
    let start = out.len();
    out.resize(start + inner_len, 0);
    inner.emit(&mut out[start..]);
    let total = out.len() as u32;
    out[..4].copy_from_slice(&total.to_ne_bytes());
    out
}

/// `IPCTNL_MSG_CT_DELETE` for exactly `flow`: original tuple, zone and id.
fn delete_message(flow: &Flow) -> ConntrackMessage {
    let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(flow.orig_src.ip()),
            IPTuple::DestinationAddress(flow.orig_dst.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(flow.protocol.into()),
            ProtoTuple::SourcePort(flow.orig_src.port()),
            ProtoTuple::DestinationPort(flow.orig_dst.port()),
        ]),
    ])];
    if flow.zone != 0 {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ZONE,
            flow.zone.to_be_bytes().to_vec(),
        )));
    }
    if let Some(id) = flow.id {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ID,
            id.to_be_bytes().to_vec(),
        )));
    }
    ConntrackMessage::Delete(attributes)
}

/// Decodes one dumped entry; `None` when it lacks a tuple we understand.
fn parse_flow(bytes: &[u8]) -> Option<Flow> {
    let message = match NetlinkMessage::<NetfilterMessage>::deserialize(bytes) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "undecodable conntrack entry");
            return None;
        }
    };
    let NetlinkPayload::InnerMessage(NetfilterMessage {
        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
        ..
    }) = message.payload
    else {
        return None;
    };
    flow_from_attributes(&attributes)
}

fn flow_from_attributes(attributes: &[ConntrackAttribute]) -> Option<Flow> {
    let mut orig = None;
    let mut reply = None;
    let mut zone = 0;
    let mut id = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(tuple) => orig = parse_tuple(tuple),
            ConntrackAttribute::CtaTupleReply(tuple) => reply = parse_tuple(tuple),
            ConntrackAttribute::Other(nla) => match nla.kind() & NLA_TYPE_MASK {
                CTA_ID => id = raw_value::<4>(nla).map(u32::from_be_bytes),
                CTA_ZONE => zone = raw_value::<2>(nla).map(u16::from_be_bytes).unwrap_or(0),
                _ => {}
            },
            _ => {}
        }
    }
    let (protocol, orig_src, orig_dst) = orig?;
    let (_, reply_src, reply_dst) = reply?;
    Some(Flow {
        protocol,
        orig_src,
        orig_dst,
        reply_src,
        reply_dst,
        zone,
        id,
    })
}

/// The value of a fixed-size raw attribute.
fn raw_value<const N: usize>(nla: &DefaultNla) -> Option<[u8; N]> {
    if nla.value_len() != N {
        return None;
    }
    let mut value = [0u8; N];
    nla.emit_value(&mut value);
    Some(value)
}

/// `(protocol, source, destination)` of a `CTA_TUPLE_*`.
fn parse_tuple(tuple: &[Tuple]) -> Option<(u8, SocketAddr, SocketAddr)> {
    let mut src: Option<IpAddr> = None;
    let mut dst: Option<IpAddr> = None;
    let mut protocol = None;
    let (mut sport, mut dport) = (0, 0);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => protocol = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => sport = *p,
                        ProtoTuple::DestinationPort(p) => dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        protocol?,
        SocketAddr::new(src?, sport),
        SocketAddr::new(dst?, dport),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A delete request survives a round trip through the crate's own parser, with the raw
    /// zone and id attributes where the kernel expects them.
    #[test]
    fn delete_request_round_trips() {
        let mut flow = Flow::new(
            17,
            sa("10.200.0.1:40000"),
            sa("10.96.0.10:53"),
            sa("10.244.0.10:5353"),
            sa("10.200.0.1:40000"),
        );
        flow.zone = 5;
        flow.id = Some(0xdead_beef);
        let mut out = Vec::new();
        NetlinkConntrack::encode(
            &mut out,
            9,
            NLM_F_REQUEST | NLM_F_ACK,
            IpFamily::V4,
            delete_message(&flow),
        );
        let message = NetlinkMessage::<NetfilterMessage>::deserialize(&out).unwrap();
        assert_eq!(message.header.sequence_number, 9);
        assert_eq!(message.header.message_type, (1 << 8) | 2);
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            header,
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attributes)),
            ..
        }) = message.payload
        else {
            panic!("not a conntrack delete: {:?}", message.payload);
        };
        assert_eq!(header.family, NetfilterProtoFamily::IPv4);
        // The orig tuple parses back; pretend it is also the reply to reuse the parser.
        let mut with_reply = attributes.clone();
        if let ConntrackAttribute::CtaTupleOrig(t) = &attributes[0] {
            with_reply.push(ConntrackAttribute::CtaTupleReply(t.clone()));
        }
        let parsed = flow_from_attributes(&with_reply).unwrap();
        assert_eq!(parsed.protocol, 17);
        assert_eq!(parsed.orig_src, flow.orig_src);
        assert_eq!(parsed.orig_dst, flow.orig_dst);
        assert_eq!(parsed.zone, 5);
        assert_eq!(parsed.id, Some(0xdead_beef));
    }

    #[test]
    fn dump_request_carries_the_protocol_filter() {
        let out = dump_request(1, IpFamily::V6, Some(17));
        // The crate parses it back: a conntrack get with the protocol in the orig tuple.
        let message = NetlinkMessage::<NetfilterMessage>::deserialize(&out).unwrap();
        assert_eq!(message.header.length as usize, out.len());
        assert_eq!(message.header.flags, NLM_F_REQUEST | NLM_F_DUMP);
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            header,
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Get(attributes)),
            ..
        }) = message.payload
        else {
            panic!("not a conntrack get: {:?}", message.payload);
        };
        assert_eq!(header.family, NetfilterProtoFamily::IPv6);
        assert_eq!(
            attributes[0],
            ConntrackAttribute::CtaTupleOrig(vec![Tuple::Proto(vec![ProtoTuple::Protocol(
                17u8.into()
            )])])
        );
        // The trailing CTA_FILTER: nested flag set, one u32 of flags.
        let filter = &out[out.len() - 12..];
        assert_eq!(u16::from_ne_bytes([filter[0], filter[1]]), 12);
        assert_eq!(
            u16::from_ne_bytes([filter[2], filter[3]]),
            CTA_FILTER | NLA_F_NESTED
        );
        assert_eq!(
            u16::from_ne_bytes([filter[6], filter[7]]),
            CTA_FILTER_ORIG_FLAGS
        );
        assert_eq!(
            u32::from_ne_bytes(filter[8..12].try_into().unwrap()),
            CTA_FILTER_F_CTA_PROTO_NUM
        );
    }

    #[test]
    fn unfiltered_dump_request_is_bare() {
        let out = dump_request(2, IpFamily::V4, None);
        // nlmsghdr + nfgenmsg, no attributes: the kernel filters on the family only.
        assert_eq!(out.len(), 20);
        assert_eq!(out[16], 2, "AF_INET");
    }

    #[test]
    fn ack_codes() {
        assert!(ack_result("delete", None).is_ok());
        assert!(matches!(
            ack_result("delete", std::num::NonZeroI32::new(-ENOENT)),
            Err(ConntrackError::NotFound)
        ));
        let err = ack_result("delete", std::num::NonZeroI32::new(-1)).unwrap_err();
        assert!(err.to_string().contains("delete"), "{err}");
    }
}
