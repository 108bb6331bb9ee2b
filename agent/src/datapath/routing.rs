//! The policy routing that delivers intercepted packets to the local proxy: marked packets look up a table
//! whose only routes are `local 0.0.0.0/0` and `local ::/0`. Installed and removed through rtnetlink.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::{
    packet_route::{
        route::{RouteAttribute, RouteMessage, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily,
    },
    Handle, IpVersion, RouteMessageBuilder,
};

/// The mark the classifier sets on intercepted packets, and the bits of it that are Sluice's.
pub const MARK: u32 = 0x200;
pub const MARK_MASK: u32 = 0xf00;
pub const ROUTE_TABLE: u32 = 100;
pub const RULE_PRIORITY: u32 = 9000;
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
#[error("{what} (policy routing for intercepted traffic: fwmark {MARK:#x}/{MARK_MASK:#x} → table {ROUTE_TABLE})")]
pub struct RoutingError {
    what: String,
    #[source]
    source: rtnetlink::Error,
}

/// The rules and routes for interception, in the agent's network namespace.
pub struct InterceptRouting {
    handle: Handle,
}

impl InterceptRouting {
    /// Connects to rtnetlink (the connection task runs on the current tokio runtime).
    pub fn connect() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(InterceptRouting { handle })
    }

    /// Installs the rules and routes: a rule already in place stays, the routes are replaced (atomically).
    pub async fn install(&self) -> Result<(), RoutingError> {
        for (family, version) in [(AddressFamily::Inet, IpVersion::V4), (AddressFamily::Inet6, IpVersion::V6)] {
            // A rule in place is left there (a previous agent's, which a successor adopts): removing it for a
            // moment would let intercepted traffic be forwarded past the proxy. Rules are not replaced by the
            // kernel, and one added again would be a second copy.
            if self.has_rule(family, version).await? {
                continue;
            }
            let mut add = self.handle.rule().add();
            *add.message_mut() = rule(family);
            match add.execute().await {
                // Another agent on the node (or this one's follower) put the same rule back meanwhile: it is there.
                Err(rtnetlink::Error::NetlinkError(message)) if message.raw_code() == -nix::libc::EEXIST => {}
                result => {
                    result.map_err(|source| RoutingError { what: format!("adding the {family:?} rule"), source })?
                }
            }
        }
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            self.handle
                .route()
                .add(route(family))
                .replace()
                .execute()
                .await
                .map_err(|source| RoutingError { what: format!("adding the {family:?} local route"), source })?;
        }
        Ok(())
    }

    /// Whether a rule or route of interception is missing (removed by hand, or by another agent on the node):
    /// checked often, so that intercepted traffic is not left to be forwarded past the proxy.
    pub async fn missing(&self) -> Result<bool, RoutingError> {
        for (family, version) in [(AddressFamily::Inet, IpVersion::V4), (AddressFamily::Inet6, IpVersion::V6)] {
            if !self.has_rule(family, version).await? {
                return Ok(true);
            }
            let mut listing = RouteMessage::default();
            listing.header.address_family = family;
            let mut routes = self.handle.route().get(listing).execute();
            let mut found = false;
            while let Some(found_route) = routes
                .try_next()
                .await
                .map_err(|source| RoutingError { what: format!("listing the {family:?} routes"), source })?
            {
                found |= found_route.header.kind == RouteType::Local
                    && found_route.header.destination_prefix_length == 0
                    && (u32::from(found_route.header.table) == ROUTE_TABLE
                        || found_route.attributes.contains(&RouteAttribute::Table(ROUTE_TABLE)));
            }
            if !found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the rule of interception for `family` is in place.
    async fn has_rule(&self, family: AddressFamily, version: IpVersion) -> Result<bool, RoutingError> {
        let wanted = rule(family);
        let mut rules = self.handle.rule().get(version).execute();
        let mut found = false;
        while let Some(found_rule) = rules
            .try_next()
            .await
            .map_err(|source| RoutingError { what: format!("listing the {family:?} rules"), source })?
        {
            found |= wanted.attributes.iter().all(|attribute| found_rule.attributes.contains(attribute))
                && found_rule.header.action == wanted.header.action;
        }
        Ok(found)
    }

    /// Removes the rules and routes; what is already gone is not an error.
    pub async fn remove(&self) -> Result<(), RoutingError> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            ignore_missing(self.handle.rule().del(rule(family)).execute().await, || {
                format!("removing the {family:?} rule")
            })?;
            ignore_missing(self.handle.route().del(route(family)).execute().await, || {
                format!("removing the {family:?} local route")
            })?;
        }
        Ok(())
    }
}

fn ignore_missing(result: Result<(), rtnetlink::Error>, what: impl Fn() -> String) -> Result<(), RoutingError> {
    match result {
        Err(rtnetlink::Error::NetlinkError(message))
            if message.raw_code() == -nix::libc::ENOENT || message.raw_code() == -nix::libc::ESRCH =>
        {
            Ok(())
        }
        Err(source) => Err(RoutingError { what: what(), source }),
        Ok(()) => Ok(()),
    }
}

fn rule(family: AddressFamily) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = family;
    message.header.action = RuleAction::ToTable;
    message.header.table = 0;
    message.attributes.push(RuleAttribute::Table(ROUTE_TABLE));
    message.attributes.push(RuleAttribute::FwMark(MARK));
    message.attributes.push(RuleAttribute::FwMask(MARK_MASK));
    message.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
    message
}

fn route(family: AddressFamily) -> RouteMessage {
    let message = if family == AddressFamily::Inet {
        RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
    } else {
        return RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(LOOPBACK_IFINDEX)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build();
    };
    message
        .output_interface(LOOPBACK_IFINDEX)
        .table_id(ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build()
}
