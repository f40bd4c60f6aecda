//! The reference hop: Debian's nginx with `grpc_pass`, installed with apt-get when missing,
//! configured from `bench/nginx.conf.template` and run unprivileged on a loopback port.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::procs::{self, Proc};

/// The configuration template, with double-braced fields.
const TEMPLATE: &str = include_str!("../../../bench/nginx.conf.template");

/// The nginx binary, installing Debian's package if there is none; `Err` says why there is
/// still none.
pub(crate) fn ensure_installed() -> Result<PathBuf, String> {
    procs::ensure_package("nginx", find)
}

fn find() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `(major, minor, patch)` from `nginx -v`.
pub(crate) fn version(nginx: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(nginx).arg("-v").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stderr))
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split("nginx/").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// The configuration for a listener on `port` passing to ping on `upstream_port`.
pub(crate) fn render(
    prefix: &Path,
    port: u16,
    upstream_port: u16,
    workers: usize,
    version: (u32, u32, u32),
) -> String {
    // `http2 on;` replaced `listen … http2` in 1.25.1; Debian 12 ships 1.22.
    let new_syntax = version >= (1, 25, 1);
    TEMPLATE
        .replace("{{WORKERS}}", &workers.to_string())
        .replace("{{PREFIX}}", &prefix.display().to_string())
        .replace("{{PORT}}", &port.to_string())
        .replace("{{UPSTREAM_PORT}}", &upstream_port.to_string())
        .replace("{{LISTEN_HTTP2}}", if new_syntax { "" } else { "http2" })
        .replace("{{HTTP2_ON}}", if new_syntax { "http2 on;" } else { "" })
}

/// Writes the configuration under `prefix` and starts nginx on it. As root, nginx runs as
/// `nobody` (through `setpriv`), owning only `prefix`.
pub(crate) fn start(
    nginx: &Path,
    prefix: &Path,
    logs: &Path,
    port: u16,
    upstream_port: u16,
    workers: usize,
) -> Result<Proc, String> {
    let version = version(nginx).unwrap_or((1, 22, 0));
    std::fs::create_dir_all(prefix.join("tmp"))
        .map_err(|e| format!("{}: {e}", prefix.display()))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, render(prefix, port, upstream_port, workers, version))
        .map_err(|e| format!("{}: {e}", conf.display()))?;
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let mut cmd = if root {
        let chown = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(prefix)
            .status()
            .is_ok_and(|s| s.success());
        if !chown {
            return Err(format!("cannot chown {} to nobody", prefix.display()));
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(nginx);
        cmd
    } else {
        Command::new(nginx)
    };
    cmd.arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(prefix.join("error.log"));
    Proc::spawn("nginx", cmd, logs, "QUIT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_read_from_nginx_v() {
        assert_eq!(
            parse_version("nginx version: nginx/1.22.1\n"),
            Some((1, 22, 1))
        );
        assert_eq!(parse_version("command not found"), None);
    }

    #[test]
    fn config_is_tuned_and_uses_the_right_http2_syntax() {
        let prefix = Path::new("/tmp/x");
        let old = render(prefix, 1234, 5678, 2, (1, 22, 1));
        assert!(old.contains("listen 127.0.0.1:1234 http2;"));
        assert!(!old.contains("http2 on;"));
        assert!(old.contains("server 127.0.0.1:5678;"));
        assert!(old.contains("worker_processes 2;"));
        assert!(old.contains("pid /tmp/x/nginx.pid;"));
        assert!(old.contains("keepalive 1024;"));
        assert!(!old.contains("{{"), "every field filled in");
        let new = render(prefix, 1234, 5678, 2, (1, 26, 0));
        assert!(new.contains("listen 127.0.0.1:1234 ;"));
        assert!(new.contains("http2 on;"));
    }
}
