//! A network on one machine: hosts in network namespaces of their own, each joined by a veth
//! pair to a bridge in a namespace of its own (the switch), with addresses this module gives
//! them (10.77.0.0/24, inside those namespaces only); a host's link can be capped, as a NIC of
//! that speed (`tc`'s token bucket, both ways). Processes run on a host through
//! `ip netns exec`, which also gives them the host's own `/etc/hosts`; the test reaches a host's
//! ports from a thread that enters the host's namespace. Dropping the [`Lan`] deletes every
//! namespace it made. Needs root and `ip` (iproute2).

use anyhow::{Context, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first three octets of every host's address.
const SUBNET: [u8; 3] = [10, 77, 0];

/// A switch and the hosts on it.
pub struct Lan {
    prefix: String,
    namespaces: Vec<String>,
    next_host: u8,
}

/// A host on a [`Lan`]: a network namespace with one interface, `eth0`, at `ip`.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace's name (as `ip netns` knows it).
    pub netns: String,
    /// The host's address.
    pub ip: Ipv4Addr,
}

/// Runs `ip args…`, failing with what it printed.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    iproute2("ip", args)
}

/// Runs `program args…`, one of iproute2's (`ip`, `tc`), failing with what it printed.
fn iproute2(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!(
            "running `{program}` (iproute2): install it (hack/test.sh does) for the network-namespace tests"
        )
    })?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes the namespaces a process that no longer runs left behind (a test killed mid-way).
fn delete_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if crate::procs::left_by_a_dead_process(&name, "mc", 'n') {
            let _ = ip(&["netns", "del", &name]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&name));
        }
    }
}

impl Lan {
    /// Makes the switch: a namespace holding the bridge every host's veth joins.
    pub fn new() -> anyhow::Result<Lan> {
        crate::procs::require_root()?;
        delete_stale();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "mc{}n{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut lan = Lan {
            prefix,
            namespaces: Vec::new(),
            next_host: 1,
        };
        let switch = lan.add_namespace("switch")?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        Ok(lan)
    }

    fn switch(&self) -> &str {
        &self.namespaces[0]
    }

    fn add_namespace(&mut self, label: &str) -> anyhow::Result<String> {
        let name = format!("{}-{label}", self.prefix);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Adds a host: its namespace, a veth pair from its `eth0` to the switch, its address.
    pub fn host(&mut self, label: &str) -> anyhow::Result<Host> {
        let n = self.next_host;
        anyhow::ensure!(n < 250, "a Lan holds at most 249 hosts");
        self.next_host += 1;
        let netns = self.add_namespace(label)?;
        let port = format!("p{n}");
        let switch = self.switch().to_owned();
        ip(&[
            "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &port, "netns",
            &switch,
        ])?;
        ip(&["-n", &switch, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &switch, "link", "set", &port, "up"])?;
        let ip_addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], n);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        Ok(Host { netns, ip: ip_addr })
    }

    /// Caps `host`'s link at `bytes_per_second` each way, as a NIC of that speed: its `eth0`
    /// shapes what it sends, its port on the switch what it receives.
    pub fn cap_link(&self, host: &Host, bytes_per_second: u64) -> anyhow::Result<()> {
        let port = format!("p{}", host.ip.octets()[3]);
        let rate = format!("{}bit", bytes_per_second * 8);
        // A bucket that holds at least a few full-size (GSO) packets, else they are dropped.
        let burst = (bytes_per_second / 50).max(256 << 10).to_string();
        for (netns, dev) in [
            (host.netns.as_str(), "eth0"),
            (self.switch(), port.as_str()),
        ] {
            iproute2(
                "tc",
                &[
                    "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                    &burst, "latency", "50ms",
                ],
            )?;
        }
        Ok(())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for name in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", name]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

impl Host {
    /// The program and arguments that run `program args…` on this host (`ip netns exec`).
    pub fn wrap(&self, program: &Path, args: &[&str]) -> (PathBuf, Vec<String>) {
        let mut all = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            self.netns.clone(),
            program.display().to_string(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        (PathBuf::from("ip"), all)
    }

    /// Names this host resolves, as a cluster's DNS would (the `/etc/hosts` that processes
    /// started on it see, beside localhost's).
    pub fn set_hosts(&self, entries: &[(Ipv4Addr, &str)]) -> anyhow::Result<()> {
        let dir = Path::new("/etc/netns").join(&self.netns);
        std::fs::create_dir_all(&dir)?;
        let mut text = String::from("127.0.0.1 localhost\n");
        for (addr, name) in entries {
            text.push_str(&format!("{addr} {name}\n"));
        }
        std::fs::write(dir.join("hosts"), text)?;
        Ok(())
    }

    /// Runs `f` on a thread inside this host's network namespace (for connections the test
    /// itself makes to the host's ports).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        let path = Path::new("/run/netns").join(&self.netns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {}", self.netns))?;
                f()
            })
            .join()
            .expect("a thread in a network namespace panicked")
        })
    }

    /// `GET http://addr/path` from this host: the status and the body.
    pub fn http_get(&self, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
        self.run(|| crate::procs::http_get(addr, path))
    }
}
