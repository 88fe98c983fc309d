//! A network namespace of the test's own, reached from here over a veth pair and a route, so
//! a destination can live on an address that is neither loopback nor on a local interface's
//! network (Dante's client library sends both of those direct, bypassing the proxy).
//! Everything is removed on drop. Needs root and iproute2.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};

/// A namespace `ns` with a veth pair: `near` here (10.213.N.1/30), `far` inside (10.213.N.2/30),
/// and `service` (198.19.N.1/32, on the namespace's loopback) routed from here via `far`.
pub struct NetNs {
    pub name: String,
    near_if: String,
    pub near: Ipv4Addr,
    pub service: Ipv4Addr,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    /// Sets the namespace up; `Err` says why it could not be (not root, no iproute2...).
    pub fn create(tag: &str) -> Result<NetNs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let n = (std::process::id() % 250) as u8 + 1;
        let name = format!("ps-{tag}-{}", std::process::id());
        let near_if = format!("ps{n}{tag}a");
        let far_if = format!("ps{n}{tag}b");
        let near = Ipv4Addr::new(10, 213, n, 1);
        let far = Ipv4Addr::new(10, 213, n, 2);
        let service = Ipv4Addr::new(198, 19, n, 1);
        let ns = NetNs {
            name: name.clone(),
            near_if: near_if.clone(),
            near,
            service,
            children: Vec::new(),
        };
        // Leftovers of a crashed run with the same pid would make every step fail.
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &near_if]);
        ip(&["netns", "add", &name])?;
        ip(&["link", "add", &near_if, "type", "veth", "peer", "name", &far_if])?;
        ip(&["link", "set", &far_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{near}/30"), "dev", &near_if])?;
        ip(&["link", "set", &near_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{far}/30"), "dev", &far_if])?;
        inside(&["link", "set", &far_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{service}/32"), "dev", "lo"])?;
        inside(&["route", "add", "default", "via", &near.to_string()])?;
        ip(&["route", "replace", &format!("{service}/32"), "via", &far.to_string()])?;
        Ok(ns)
    }

    /// Starts `program args` inside the namespace with piped stdout; killed on drop.
    pub fn spawn(&mut self, program: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a program in the namespace");
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = ip(&["route", "del", &format!("{}/32", self.service)]);
        let _ = ip(&["link", "del", &self.near_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A namespace with nothing but its loopback (127.0.0.0/8 and `::1`): no route leaves it. A
/// test runs its proxy, destinations and clients inside (`run`), where `nft` rules and `ss`
/// see only the test's own sockets. Removed on drop. Needs root and iproute2.
pub struct LoopbackNs {
    pub name: String,
}

impl LoopbackNs {
    /// `Err` says why it could not be set up (not root, no iproute2...).
    pub fn create(tag: &str) -> Result<LoopbackNs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let name = format!("ps-{tag}-{}", std::process::id());
        // Leftovers of a crashed run with the same pid would make the add fail.
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = LoopbackNs { name };
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `program args` inside and returns its stdout; `Err` on failure, with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs `test` on a thread of its own inside the namespace, on a runtime of its own: every
    /// socket it opens (and every thread it starts) is inside. A panic in it is this panic.
    pub fn run<F>(&self, test: impl FnOnce() -> F + Send + 'static)
    where
        F: std::future::Future<Output = ()>,
    {
        let path = format!("/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let namespace = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: a valid namespace descriptor; setns changes this thread's namespace only.
            let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(test());
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for LoopbackNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
