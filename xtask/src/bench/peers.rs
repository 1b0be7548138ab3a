//! Peer proxies, configured as a fair single-hop HTTP/1.1 keep-alive proxy
//! on one thread, with logging off, and run in the foreground with every
//! file under `target/bench`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

use super::process::{self, Child};

/// Starts HAProxy (one thread, http mode, server connections always reused).
pub fn haproxy(
    bin: &Path,
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<Child> {
    let path = dir.join(format!("{name}.cfg"));
    write(&path, &haproxy_config(listen, upstream))?;
    let mut command = Command::new(bin);
    // -db: stay in the foreground, one process.
    command.arg("-db").arg("-f").arg(&path);
    let mut child = Child::spawn(name, command, &dir.join(format!("{name}.log")))?;
    child.wait_ready("accepting connections", || process::accepts(listen))?;
    Ok(child)
}

/// Starts nginx (one process, upstream keep-alive).
pub fn nginx(
    bin: &Path,
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<Child> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(&prefix)
        .with_context(|| format!("cannot create {}", prefix.display()))?;
    let path = dir.join(format!("{name}.conf"));
    write(&path, &nginx_config(&prefix, listen, upstream))?;
    let mut command = Command::new(bin);
    // -e: the error log before the config is read; Debian's default is
    // stderr, but say so rather than rely on it.
    command
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&path)
        .args(["-e", "stderr"]);
    let mut child = Child::spawn(name, command, &dir.join(format!("{name}.log")))?;
    child.wait_ready("accepting connections", || process::accepts(listen))?;
    Ok(child)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn haproxy_config(listen: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "\
global
    nbthread 1
    maxconn 1000

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bench
    bind {listen}
    default_backend upstream

backend upstream
    server upstream {upstream}
"
    )
}

/// `master_process off` keeps nginx to the one process we measure and kill;
/// with a master, killing it would orphan the worker.
fn nginx_config(prefix: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let prefix = prefix.display();
    format!(
        "\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream backend {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {listen};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_both_addresses_and_the_one_thread_settings() -> anyhow::Result<()> {
        let listen: SocketAddr = "127.0.0.1:8001".parse()?;
        let upstream: SocketAddr = "127.0.0.1:8002".parse()?;
        let haproxy = haproxy_config(listen, upstream);
        assert!(haproxy.contains("bind 127.0.0.1:8001"));
        assert!(haproxy.contains("server upstream 127.0.0.1:8002"));
        assert!(haproxy.contains("nbthread 1"));
        let nginx = nginx_config(Path::new("/t/nginx"), listen, upstream);
        assert!(nginx.contains("listen 127.0.0.1:8001;"));
        assert!(nginx.contains("server 127.0.0.1:8002;"));
        assert!(nginx.contains("pid /t/nginx/nginx.pid;"));
        assert!(nginx.contains("proxy_set_header Connection \"\";"));
        Ok(())
    }
}
