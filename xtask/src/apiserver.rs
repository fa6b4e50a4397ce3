//! A Kubernetes API-server double for the tests: it speaks the real list/watch protocol over
//! HTTP for Nodes and Pods (resourceVersion, ADDED/MODIFIED/DELETED events, bookmarks, 410 Gone
//! after a compaction, 403 Forbidden), and can drop its connections or go down, so that the
//! agent's Kubernetes source is tested against what kube-rs really sends and receives.
//!
//! It serves JSON the tests build (real Node/Pod objects), one thread per connection.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Pod,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/nodes" => Some(Kind::Node),
            "/api/v1/pods" => Some(Kind::Pod),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (kind, namespace/name) -> object
    objects: BTreeMap<(Kind, String), Value>,
    /// The same objects, serialized once when they change (lists are then string joins).
    rendered: BTreeMap<(Kind, String), String>,
    /// Every change: (resourceVersion, kind, type, object).
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    forbidden: BTreeSet<Kind>,
    down: bool,
    /// Bumped to end every open watch (dropped connections).
    generation: u64,
    /// Bumped to make open watches send a bookmark.
    bookmarks: u64,
    /// Request lines seen, for assertions.
    requests: Vec<String>,
}

/// The running double. Dropping it stops it.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
}

fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or_default()),
        None => m["name"].as_str().unwrap_or_default().to_owned(),
    }
}

impl ApiServer {
    /// Starts on 127.0.0.1, on a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").context("binding the API double")?)
    }

    /// Starts on a listener made elsewhere (e.g. inside a lab namespace).
    pub fn start_on(listener: TcpListener) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new((
            Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let (s, st) = (s.clone(), st.clone());
                        thread::spawn(move || {
                            let _ = serve(sock, &s, &st);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(ApiServer { addr, shared, stop })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut st);
        cv.notify_all();
        out
    }

    /// Creates or updates an object (ADDED or MODIFIED).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        self.with(|st| {
            st.rv += 1;
            obj["apiVersion"] = json!("v1");
            obj["kind"] = json!(kind.name());
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            let k = (kind, key(&obj));
            let ty = if st.objects.contains_key(&k) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.rendered.insert(k.clone(), obj.to_string());
            st.objects.insert(k, obj.clone());
            let rv = st.rv;
            st.history.push((rv, kind, ty, obj));
        });
    }

    /// Deletes an object (DELETED) by `name` or `namespace/name`.
    pub fn delete(&self, kind: Kind, name: &str) {
        self.with(|st| {
            st.rendered.remove(&(kind, name.to_owned()));
            if let Some(mut obj) = st.objects.remove(&(kind, name.to_owned())) {
                st.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                let rv = st.rv;
                st.history.push((rv, kind, "DELETED", obj));
            }
        });
    }

    /// Forgets the event history: open watches get `410 Gone` and must relist.
    pub fn compact(&self) {
        self.with(|st| {
            // A client that knows a version older than now has missed events it can no longer
            // get; one that lists now (and gets the current version) has not.
            st.compacted_below = st.rv;
            st.history.clear();
        });
    }

    /// Ends every open watch (a dropped connection); clients reconnect from their last version.
    pub fn drop_connections(&self) {
        self.with(|st| st.generation += 1);
    }

    /// Down: every connection is closed at once, and open watches end.
    pub fn set_down(&self, down: bool) {
        self.with(|st| {
            st.down = down;
            st.generation += 1;
        });
    }

    /// 403 Forbidden for lists and watches of `kind` (RBAC without the permission).
    pub fn set_forbidden(&self, kind: Kind, forbidden: bool) {
        self.with(|st| {
            if forbidden {
                st.forbidden.insert(kind);
            } else {
                st.forbidden.remove(&kind);
            }
        });
    }

    /// Makes open watches send a bookmark.
    pub fn bookmark(&self) {
        self.with(|st| st.bookmarks += 1);
    }

    pub fn requests(&self) -> Vec<String> {
        self.with(|st| st.requests.clone())
    }

    /// A kubeconfig pointing at the double (plain HTTP).
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: test\ncurrent-context: double\nusers:\n- name: test\n  user:\n    token: test-token\n",
            self.addr
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.with(|st| st.generation += 1);
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(sock: &mut TcpStream, code: u16, text: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        sock,
        "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn respond_raw(sock: &mut TcpStream, code: u16, text: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes())?;
    sock.write_all(body.as_bytes())
}

fn chunk(sock: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(sock, "{:x}\r\n{data}\r\n", data.len())?;
    sock.flush()
}

fn serve(
    mut sock: TcpStream,
    shared: &Arc<(Mutex<State>, Condvar)>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    sock.set_nonblocking(false)?;
    let mut reader = BufReader::new(sock.try_clone()?);
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        // Headers, up to the blank line.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
        }
        let target = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
        let (m, cv) = &**shared;
        let (down, forbidden) = {
            let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
            st.requests.push(request.trim().to_owned());
            let kind = Kind::from_path(path);
            (st.down, kind.is_some_and(|k| st.forbidden.contains(&k)))
        };
        if down {
            // Unreachable: the connection closes without an answer.
            return Ok(());
        }
        let Some(kind) = Kind::from_path(path) else {
            respond(
                &mut sock,
                404,
                "Not Found",
                &status(404, "NotFound", "no such resource"),
            )?;
            continue;
        };
        if forbidden {
            let msg = format!(
                "{}s is forbidden: User \"system:serviceaccount:st8s:st8s\" cannot list resource",
                kind.name().to_lowercase()
            );
            respond(&mut sock, 403, "Forbidden", &status(403, "Forbidden", &msg))?;
            continue;
        }
        if params.get("watch").is_some_and(|w| *w == "true" || *w == "1") {
            return watch(sock, shared, stop, kind, &params);
        }
        let st = m.lock().unwrap_or_else(|e| e.into_inner());
        // Pages: `limit` objects from the `continue` offset, as kube-rs asks for them.
        let offset: usize = params.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let total = st.rendered.keys().filter(|(k, _)| *k == kind).count();
        let items: Vec<&str> = st
            .rendered
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .skip(offset)
            .take(limit)
            .map(|(_, v)| v.as_str())
            .collect();
        let mut meta = json!({"resourceVersion": st.rv.to_string()});
        if offset.saturating_add(items.len()) < total {
            meta["continue"] = json!((offset + items.len()).to_string());
        }
        let body = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"{}List\",\"metadata\":{meta},\"items\":[{}]}}",
            kind.name(),
            items.join(",")
        );
        drop(st);
        respond_raw(&mut sock, 200, "OK", &body)?;
        cv.notify_all();
    }
}

fn watch(
    mut sock: TcpStream,
    shared: &Arc<(Mutex<State>, Condvar)>,
    stop: &AtomicBool,
    kind: Kind,
    params: &BTreeMap<&str, &str>,
) -> std::io::Result<()> {
    let (m, cv) = &**shared;
    let mut from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks_wanted = params.get("allowWatchBookmarks").is_some_and(|v| *v == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64)
        .min(290);
    write!(
        sock,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
    let generation = st.generation;
    let mut bookmarks_seen = st.bookmarks;
    loop {
        if from != 0 && from < st.compacted_below {
            let gone = status(410, "Expired", "too old resource version");
            drop(st);
            chunk(&mut sock, &json!({"type": "ERROR", "object": gone}))?;
            break;
        }
        let events: Vec<(u64, &'static str, Value)> = st
            .history
            .iter()
            .filter(|(rv, k, ..)| *k == kind && *rv > from)
            .map(|(rv, _, ty, obj)| (*rv, *ty, obj.clone()))
            .collect();
        let bookmark = bookmarks_wanted && st.bookmarks != bookmarks_seen;
        bookmarks_seen = st.bookmarks;
        let rv_now = st.rv;
        drop(st);
        for (rv, ty, obj) in events {
            chunk(&mut sock, &json!({"type": ty, "object": obj}))?;
            from = rv;
        }
        if bookmark {
            let obj = json!({"kind": kind.name(), "apiVersion": "v1", "metadata": {"resourceVersion": rv_now.to_string()}});
            chunk(&mut sock, &json!({"type": "BOOKMARK", "object": obj}))?;
            from = from.max(rv_now);
        }
        st = m.lock().unwrap_or_else(|e| e.into_inner());
        if stop.load(Ordering::Relaxed) || st.generation != generation {
            // Dropped: no terminating chunk, as when a connection breaks.
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        let has_more = st.history.iter().any(|(rv, k, ..)| *k == kind && *rv > from);
        if !has_more && st.bookmarks == bookmarks_seen && !(from != 0 && from < st.compacted_below) {
            st = cv
                .wait_timeout(st, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
    write!(sock, "0\r\n\r\n")?;
    sock.flush()
}

/// A Node as the API serves it.
pub fn node(name: &str, ip: &str, ready: bool) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"st8s.io/zone": "lab"}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

/// A Pod with one hostPort as the API serves it.
pub fn pod(name: &str, node: &str, ip: &str, host_port: u16, container_port: u16, proto: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "lab"},
        "spec": {"nodeName": node, "containers": [{"name": "server", "image": "lab",
                 "ports": [{"containerPort": container_port, "hostPort": host_port, "protocol": proto}]}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    })
}
