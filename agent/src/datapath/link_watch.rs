//! The kernel's word that the node's interfaces, addresses or routing changed: rtnetlink multicast groups, so
//! that a new or re-created interface is attached at once rather than at the next periodic check.

use futures_util::StreamExt;
use rtnetlink::{
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE, RTMGRP_IPV6_IFADDR, RTMGRP_LINK},
    packet_core::NetlinkMessage,
    packet_route::RouteNetlinkMessage,
    sys::{AsyncSocket, SocketAddr},
};

/// Changes to links, addresses, IPv4 rules and routes in the agent's network namespace, as they happen.
pub struct LinkEvents {
    messages: futures_channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl LinkEvents {
    /// Subscribes (the connection task runs on the current tokio runtime).
    pub fn subscribe() -> std::io::Result<LinkEvents> {
        let (mut connection, _handle, messages) = rtnetlink::new_connection()?;
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_RULE | RTMGRP_IPV4_ROUTE;
        connection.socket_mut().socket_mut().bind(&SocketAddr::new(0, groups))?;
        tokio::spawn(connection);
        Ok(LinkEvents { messages })
    }

    /// Waits for the next change, then takes every change already queued with it (one check serves them all).
    /// `false` once the subscription has ended.
    pub async fn changed(&mut self) -> bool {
        if self.messages.next().await.is_none() {
            return false;
        }
        while self.messages.try_recv().is_ok() {}
        true
    }
}
