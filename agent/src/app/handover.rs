//! One agent at a time writes a datapath (the pins under its --bpffs): the one that starts later takes it over,
//! once it is ready to serve.
//!
//! Ownership is an abstract Unix socket named after the pin directory, in the node's network namespace: it goes
//! with its process, so it is never stale. A starting agent that finds the name held asks the owner to hold
//! still: the owner stops writing the datapath but goes on serving, while the successor loads and attaches its
//! own. Once ready, the successor says so; the owner releases the name, answers, and drains; the successor binds
//! the name. If the successor dies (or takes more than a minute) before it is ready, the owner goes on as before:
//! a new version that cannot start never leaves the node without a proxy. This is what lets a DaemonSet surge
//! (the new pod starts beside the old one, whose listeners it shares) and what keeps two agents from writing the
//! same maps at once.

use std::{
    io,
    os::{linux::net::SocketAddrExt, unix::net::SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};

/// What a successor says, and what the owner answers: hold still (held), then release (released).
const HOLD: &[u8] = b"hold\n";
const HELD: &[u8] = b"held\n";
const TAKE: &[u8] = b"take\n";
const RELEASED: &[u8] = b"released\n";
/// How long a starting agent waits for the owner to answer, and then for the name to be free.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one asker may take to say what it wants.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an owner holds still for a successor that is not ready.
const SUCCESSOR_TIMEOUT: Duration = Duration::from_secs(60);

/// This agent's ownership of its datapath.
pub struct Ownership {
    listener: UnixListener,
}

/// A starting agent's claim on the datapath: owned already (no agent held it), or held still by its owner until
/// `complete` says this agent is ready.
pub enum Claim {
    Owned(Ownership),
    Held { name: SocketAddr, owner: UnixStream },
}

/// A successor holding the owner still.
pub struct Successor(UnixStream);

/// What became of a successor the owner held still for.
pub enum Held {
    /// It is ready: the owner releases the name (`Ownership::release`) and drains.
    Ready(Successor),
    /// It died or was not ready in time: the owner goes on.
    Gone,
}

impl Claim {
    /// Claims the datapath under `bpffs`: an agent that owns it is asked to hold still.
    pub async fn on(bpffs: &Path) -> anyhow::Result<Claim> {
        let name = socket_name(bpffs)?;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            match bind(&name) {
                Ok(listener) => return Ok(Claim::Owned(Ownership { listener })),
                Err(error) if error.kind() == io::ErrorKind::AddrInUse => {}
                Err(error) => return Err(error).context("taking the datapath's ownership (an abstract Unix socket)"),
            }
            if let Some(owner) = ask(&name).await {
                tracing::info!(bpffs = %bpffs.display(), "the agent that owns the datapath holds still until this one is ready");
                return Ok(Claim::Held { name, owner });
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "another agent owns the datapath under {} and did not answer within {ANSWER_TIMEOUT:?}",
                    bpffs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This agent is ready: the owner it held still releases the datapath (and drains), and it is this agent's.
    pub async fn complete(self) -> anyhow::Result<Ownership> {
        let (name, mut owner) = match self {
            Claim::Owned(ownership) => return Ok(ownership),
            Claim::Held { name, owner } => (name, owner),
        };
        // The owner frees the name before it answers; if it answers nothing (it stopped meanwhile), the name is
        // free all the same once it has gone.
        let released = async {
            owner.write_all(TAKE).await?;
            let mut answer = [0; RELEASED.len()];
            owner.read_exact(&mut answer).await
        };
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, released).await;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            match bind(&name) {
                Ok(listener) => {
                    tracing::info!("the previous agent handed the datapath over");
                    return Ok(Ownership { listener });
                }
                Err(error) if error.kind() == io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => return Err(error).context("taking the datapath over from the previous agent"),
            }
        }
    }
}

impl Ownership {
    /// The datapath under `bpffs` if no agent owns it, without asking.
    pub fn try_take(bpffs: &Path) -> Option<Ownership> {
        let listener = bind(&socket_name(bpffs).ok()?).ok()?;
        Some(Ownership { listener })
    }

    /// Completes when a starting agent (of the same user) asks this one to hold still.
    pub async fn successor(&self) -> Successor {
        loop {
            let Ok((mut stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let same_user = stream.peer_cred().is_ok_and(|peer| peer.uid() == nix::unistd::geteuid().as_raw());
            let mut said = [0; HOLD.len()];
            let asked = tokio::time::timeout(ASK_TIMEOUT, stream.read_exact(&mut said)).await;
            if same_user && matches!(asked, Ok(Ok(_))) && said == HOLD && stream.write_all(HELD).await.is_ok() {
                return Successor(stream);
            }
        }
    }

    /// Gives the datapath up: the name is free once this returns, and `successor` (if one is taking over) is told.
    pub async fn release(self, successor: Option<Successor>) {
        drop(self.listener);
        if let Some(Successor(mut stream)) = successor {
            let _ = stream.write_all(RELEASED).await;
        }
    }
}

impl Successor {
    /// Waits (this agent holding still) until the successor is ready, dies, or has taken too long.
    pub async fn ready(mut self) -> Held {
        let mut said = [0; TAKE.len()];
        match tokio::time::timeout(SUCCESSOR_TIMEOUT, self.0.read_exact(&mut said)).await {
            Ok(Ok(_)) if said == TAKE => Held::Ready(self),
            _ => Held::Gone,
        }
    }
}

/// The socket's name for the pins under `bpffs` (per network namespace, as abstract names are).
fn socket_name(bpffs: &Path) -> io::Result<SocketAddr> {
    let name = format!("sluice-datapath:{}", bpffs.display());
    SocketAddr::from_abstract_name(name.as_bytes())
}

fn bind(name: &SocketAddr) -> io::Result<UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind_addr(name)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Asks the owner of `name` to hold still; its connection once it has said it does.
async fn ask(name: &SocketAddr) -> Option<UnixStream> {
    let stream = std::os::unix::net::UnixStream::connect_addr(name).ok()?;
    stream.set_nonblocking(true).ok()?;
    let mut stream = UnixStream::from_std(stream).ok()?;
    let answer = async {
        stream.write_all(HOLD).await?;
        let mut answer = [0; HELD.len()];
        stream.read_exact(&mut answer).await?;
        io::Result::Ok(answer == HELD)
    };
    matches!(tokio::time::timeout(ANSWER_TIMEOUT, answer).await, Ok(Ok(true))).then_some(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(name: &str) -> std::path::PathBuf {
        Path::new("/sys/fs/bpf").join(format!("sluice-handover-unit-test-{name}-{}", std::process::id()))
    }

    #[tokio::test]
    async fn a_ready_successor_is_handed_the_datapath() {
        let pins = pins("ready");
        let Claim::Owned(first) = Claim::on(&pins).await.unwrap() else { panic!("nobody owned it") };
        let handing = tokio::spawn(async move {
            let Held::Ready(successor) = first.successor().await.ready().await else { panic!("not ready") };
            first.release(Some(successor)).await;
        });
        let claim = Claim::on(&pins).await.unwrap();
        assert!(matches!(claim, Claim::Held { .. }), "the owner holds still");
        let second = tokio::time::timeout(Duration::from_secs(5), claim.complete()).await.unwrap().unwrap();
        handing.await.unwrap();
        assert!(Ownership::try_take(&pins).is_none(), "the successor owns it");
        drop(second);
        assert!(Ownership::try_take(&pins).is_some(), "free again once its owner is gone");
    }

    #[tokio::test]
    async fn a_successor_that_dies_before_it_is_ready_leaves_the_owner_in_place() {
        let pins = pins("dies");
        let Claim::Owned(first) = Claim::on(&pins).await.unwrap() else { panic!("nobody owned it") };
        let holding = tokio::spawn(async move {
            let held = first.successor().await.ready().await;
            (matches!(held, Held::Gone), first)
        });
        let claim = Claim::on(&pins).await.unwrap();
        drop(claim);
        let (gone, first) = holding.await.unwrap();
        assert!(gone, "the owner learns its successor is gone");
        assert!(Ownership::try_take(&pins).is_none(), "and still owns the datapath");
        drop(first);
    }
}
