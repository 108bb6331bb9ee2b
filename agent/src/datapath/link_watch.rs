//! The kernel's word that the node's interfaces, addresses or routing changed (rtnetlink multicast groups), so
//! that a new or re-created interface is attached at once rather than at the next periodic check; and the
//! interfaces the default routes leave through, read on the same connection.

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::{
    constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    },
    packet_core::NetlinkMessage,
    packet_route::{
        route::{RouteAttribute, RouteHeader, RouteMessage, RouteType},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::{AsyncSocket, SocketAddr},
    Handle,
};

/// Changes to links, addresses, IPv4 rules and routes in the agent's network namespace, as they happen.
pub struct LinkEvents {
    messages: futures_channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    handle: Handle,
    /// The socket's task, ended with the subscription (it would otherwise warn of each message it cannot pass on).
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for LinkEvents {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl LinkEvents {
    /// Subscribes (the connection task runs on the current tokio runtime).
    pub fn subscribe() -> std::io::Result<LinkEvents> {
        let (mut connection, handle, messages) = rtnetlink::new_connection()?;
        let groups = RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_RULE
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE;
        connection.socket_mut().socket_mut().bind(&SocketAddr::new(0, groups))?;
        let connection = tokio::spawn(connection);
        Ok(LinkEvents { messages, handle, connection })
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

    /// The interfaces (by index) that the main table's default routes, IPv4 and IPv6, leave through now.
    pub async fn default_route_interfaces(&self) -> Result<Vec<u32>, rtnetlink::Error> {
        let mut interfaces = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut listing = RouteMessage::default();
            listing.header.address_family = family;
            let mut routes = self.handle.route().get(listing).execute();
            while let Some(route) = routes.try_next().await? {
                let in_main = route.header.table == RouteHeader::RT_TABLE_MAIN
                    || route.attributes.contains(&RouteAttribute::Table(u32::from(RouteHeader::RT_TABLE_MAIN)));
                if !in_main || route.header.destination_prefix_length != 0 || route.header.kind != RouteType::Unicast {
                    continue;
                }
                for attribute in &route.attributes {
                    match attribute {
                        RouteAttribute::Oif(index) => interfaces.push(*index),
                        RouteAttribute::MultiPath(hops) => {
                            interfaces.extend(hops.iter().map(|hop| hop.interface_index))
                        }
                        _ => {}
                    }
                }
            }
        }
        interfaces.sort_unstable();
        interfaces.dedup();
        Ok(interfaces)
    }
}
