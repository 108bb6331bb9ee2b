//! One agent at a time writes a datapath (the pins under its --bpffs): the one that starts later takes it over.
//!
//! Ownership is an abstract Unix socket named after the pin directory, in the node's network namespace: it goes
//! with its process, so it is never stale. A starting agent that finds the name held asks the owner to hand over;
//! the owner stops writing the datapath, begins its drain and releases the name, and the successor binds it. This
//! is what lets a DaemonSet surge (the new pod starts beside the old one, whose listeners it shares) and what keeps
//! a stopping agent from writing over its successor's policy.

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

/// What a successor says, and what the owner answers once the name is free.
const ASK: &[u8] = b"hand over\n";
const RELEASED: &[u8] = b"released\n";
/// How long a starting agent waits for the owner to hand over before it gives up (saying so).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one asker may take to say what it wants.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// This agent's ownership of its datapath.
pub struct Ownership {
    listener: UnixListener,
}

/// A successor waiting for the datapath: told once it is free.
pub struct Successor(UnixStream);

impl Ownership {
    /// Takes the datapath under `bpffs`, asking an agent that owns it to hand it over.
    pub async fn take(bpffs: &Path) -> anyhow::Result<Ownership> {
        let name = socket_name(bpffs)?;
        let deadline = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        let mut asked = false;
        loop {
            match bind(&name) {
                Ok(listener) => return Ok(Ownership { listener }),
                Err(error) if error.kind() == io::ErrorKind::AddrInUse => {}
                Err(error) => return Err(error).context("taking the datapath's ownership (an abstract Unix socket)"),
            }
            if !asked {
                asked = ask(&name).await;
                if asked {
                    tracing::info!(bpffs = %bpffs.display(), "the agent that owned the datapath handed it over");
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "another agent owns the datapath under {} and did not hand it over within {HANDOVER_TIMEOUT:?}",
                    bpffs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The datapath under `bpffs` if no agent owns it, without asking.
    pub fn try_take(bpffs: &Path) -> Option<Ownership> {
        let listener = bind(&socket_name(bpffs).ok()?).ok()?;
        Some(Ownership { listener })
    }

    /// Completes when a starting agent (of the same user) asks for the datapath.
    pub async fn successor(&self) -> Successor {
        loop {
            let Ok((mut stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let same_user = stream.peer_cred().is_ok_and(|peer| peer.uid() == nix::unistd::geteuid().as_raw());
            let mut said = [0; ASK.len()];
            let asked = tokio::time::timeout(ASK_TIMEOUT, stream.read_exact(&mut said)).await;
            if same_user && matches!(asked, Ok(Ok(_))) && said == ASK {
                return Successor(stream);
            }
        }
    }

    /// Gives the datapath up: the name is free once this returns, and `successor` (if one asked) is told so.
    pub async fn release(self, successor: Option<Successor>) {
        drop(self.listener);
        if let Some(Successor(mut stream)) = successor {
            let _ = stream.write_all(RELEASED).await;
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

/// Asks the owner of `name` to hand over; whether it said it did.
async fn ask(name: &SocketAddr) -> bool {
    let Ok(stream) = std::os::unix::net::UnixStream::connect_addr(name) else { return false };
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let Ok(mut stream) = UnixStream::from_std(stream) else { return false };
    let answer = async {
        stream.write_all(ASK).await?;
        let mut answer = [0; RELEASED.len()];
        stream.read_exact(&mut answer).await?;
        io::Result::Ok(answer == RELEASED)
    };
    matches!(tokio::time::timeout(HANDOVER_TIMEOUT, answer).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_owner_is_handed_the_datapath_and_the_first_hears_it_asked() {
        let pins = Path::new("/sys/fs/bpf/sluice-handover-unit-test");
        let first = Ownership::take(pins).await.unwrap();
        let handing = tokio::spawn(async move {
            let successor = first.successor().await;
            first.release(Some(successor)).await;
        });
        let second = tokio::time::timeout(Duration::from_secs(5), Ownership::take(pins)).await.unwrap().unwrap();
        handing.await.unwrap();
        drop(second);
        // Free again once its owner is gone.
        Ownership::take(pins).await.unwrap();
    }
}
