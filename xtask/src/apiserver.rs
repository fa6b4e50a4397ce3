//! A Kubernetes API-server double for the tests: it speaks the real list/watch protocol over
//! HTTP (resourceVersion, ADDED/MODIFIED/DELETED events, bookmarks, 410 Gone after a compaction,
//! 403 Forbidden, 404 for a CRD that is not installed), takes server-side apply PATCHes and GETs
//! of single objects, and can drop its connections or go down, so that st8s's Kubernetes code is
//! tested against what kube-rs really sends and receives.
//!
//! It serves JSON the tests build (real objects), one thread per connection.

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
pub use st8s::sources::resource::Resource;

use crate::deploy::ApiCall;

/// `<prefix>[/namespaces/<ns>]/<plural>[/<name>]` -> (resource, namespace, name).
fn parse_path(path: &str) -> Option<(Resource, Option<String>, Option<String>)> {
    Resource::ALL.into_iter().find_map(|k| {
        let rest = path.strip_prefix(&k.path_prefix())?.strip_prefix('/')?;
        let (ns, rest) = match rest.strip_prefix("namespaces/") {
            Some(r) => {
                let (ns, r) = r.split_once('/')?;
                (Some(ns.to_owned()), r)
            }
            None => (None, rest),
        };
        let rest = rest.strip_prefix(k.plural())?;
        match rest.strip_prefix('/') {
            Some(name) if !name.is_empty() && !name.contains('/') => Some((k, ns, Some(name.to_owned()))),
            Some(_) => None,
            None if rest.is_empty() => Some((k, ns, None)),
            None => None,
        }
    })
}

/// One server-side apply the double took.
#[derive(Clone, Debug)]
pub struct Patch {
    pub at: Instant,
    pub kind: Resource,
    /// `namespace/name`
    pub key: String,
    pub field_manager: String,
    pub body: Value,
    /// The object did not exist before: the apply created it (RBAC: `create` too).
    pub created: bool,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (kind, namespace/name) -> object
    objects: BTreeMap<(Resource, String), Value>,
    /// The same objects, serialized once when they change (lists are then string joins).
    rendered: BTreeMap<(Resource, String), String>,
    /// Every change: (resourceVersion, kind, type, object).
    history: Vec<(u64, Resource, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    forbidden: BTreeSet<Resource>,
    /// Kinds the API does not serve (a CRD that is not installed): 404.
    missing: BTreeSet<Resource>,
    patches: Vec<Patch>,
    down: bool,
    /// Bumped to end every open watch (dropped connections).
    generation: u64,
    /// Bumped to make open watches send a bookmark.
    bookmarks: u64,
    /// Request lines seen, for assertions.
    requests: Vec<String>,
    /// Watches being served right now.
    open_watches: usize,
}

/// The running double. Dropping it stops it.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl State {
    fn apply(&mut self, kind: Resource, mut obj: Value) -> Value {
        self.rv += 1;
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind());
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let k = (kind, key(&obj));
        let ty = if self.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.rendered.insert(k.clone(), obj.to_string());
        self.objects.insert(k, obj.clone());
        let rv = self.rv;
        self.history.push((rv, kind, ty, obj.clone()));
        obj
    }
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
    pub fn apply(&self, kind: Resource, obj: Value) {
        self.with(|st| st.apply(kind, obj));
    }

    /// The current object of `kind` named `name` or `namespace/name`.
    pub fn get(&self, kind: Resource, name: &str) -> Option<Value> {
        self.with(|st| st.objects.get(&(kind, name.to_owned())).cloned())
    }

    /// Every server-side apply taken so far, in order.
    pub fn patches(&self) -> Vec<Patch> {
        self.with(|st| st.patches.clone())
    }

    /// 404 for `kind` (its CRD is not installed), or served again.
    pub fn set_missing(&self, kind: Resource, missing: bool) {
        self.with(|st| {
            if missing {
                st.missing.insert(kind);
            } else {
                st.missing.remove(&kind);
            }
        });
    }

    /// Deletes an object (DELETED) by `name` or `namespace/name`.
    pub fn delete(&self, kind: Resource, name: &str) {
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
    /// How many watches the double is serving right now.
    pub fn open_watches(&self) -> usize {
        self.with(|st| st.open_watches)
    }

    pub fn set_down(&self, down: bool) {
        self.with(|st| {
            st.down = down;
            st.generation += 1;
        });
    }

    /// 403 Forbidden for lists and watches of `kind` (RBAC without the permission).
    pub fn set_forbidden(&self, kind: Resource, forbidden: bool) {
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

    /// Every distinct API call made so far, as RBAC sees it (verb, group, resource, namespace,
    /// name); a server-side apply that created its object counts as `patch` and `create`.
    pub fn calls(&self) -> BTreeSet<ApiCall> {
        let (requests, patches) = self.with(|st| (st.requests.clone(), st.patches.clone()));
        let mut calls = BTreeSet::new();
        for r in requests {
            let mut parts = r.split_whitespace();
            let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let Some((kind, namespace, name)) = parse_path(path) else {
                continue;
            };
            let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
            let verb = match (method, &name) {
                ("GET", Some(_)) => "get",
                ("GET", None) if watch => "watch",
                ("GET", None) => "list",
                ("PATCH", _) => "patch",
                ("POST", _) => "create",
                ("PUT", _) => "update",
                ("DELETE", _) => "delete",
                _ => continue,
            };
            calls.insert(ApiCall {
                verb: verb.to_owned(),
                group: kind.group().to_owned(),
                resource: kind.plural().to_owned(),
                namespace,
                name,
            });
        }
        for p in patches.iter().filter(|p| p.created) {
            let (namespace, name) = match p.key.split_once('/') {
                Some((ns, n)) => (Some(ns.to_owned()), n.to_owned()),
                None => (None, p.key.clone()),
            };
            calls.insert(ApiCall {
                verb: "create".into(),
                group: p.kind.group().to_owned(),
                resource: p.kind.plural().to_owned(),
                namespace,
                name: Some(name),
            });
        }
        calls
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
        // Headers, up to the blank line; then the body, if any.
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
            if let Some((name, value)) = h.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        let method = request.split_whitespace().next().unwrap_or("GET").to_owned();
        let target = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
        let (m, _) = &**shared;
        let parsed = parse_path(path);
        let (down, forbidden, missing) = {
            let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
            st.requests.push(request.trim().to_owned());
            let kind = parsed.as_ref().map(|p| p.0);
            (
                st.down,
                kind.is_some_and(|k| st.forbidden.contains(&k)),
                kind.is_some_and(|k| st.missing.contains(&k)),
            )
        };
        if down {
            // Unreachable: the connection closes without an answer.
            return Ok(());
        }
        let Some((kind, namespace, name)) = parsed.filter(|_| !missing) else {
            respond(
                &mut sock,
                404,
                "Not Found",
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )?;
            continue;
        };
        if forbidden {
            let msg = format!(
                "{}s is forbidden: User \"system:serviceaccount:st8s:st8s\" cannot {} resource",
                kind.kind().to_lowercase(),
                method.to_lowercase()
            );
            respond(&mut sock, 403, "Forbidden", &status(403, "Forbidden", &msg))?;
            continue;
        }
        if let Some(name) = name {
            let call = ObjectCall {
                method: &method,
                kind,
                namespace: namespace.as_deref(),
                name: &name,
                body: &body,
                field_manager: params.get("fieldManager").copied().unwrap_or_default(),
            };
            one_object(&mut sock, shared, call)?;
            continue;
        }
        let prefix = namespace.map(|ns| format!("{ns}/")).unwrap_or_default();
        if params.get("watch").is_some_and(|w| *w == "true" || *w == "1") {
            let (m, _) = &**shared;
            m.lock().unwrap_or_else(|e| e.into_inner()).open_watches += 1;
            let served = watch(sock, shared, stop, kind, &prefix, &params);
            m.lock().unwrap_or_else(|e| e.into_inner()).open_watches -= 1;
            return served;
        }
        list(&mut sock, shared, kind, &prefix, &params)?;
    }
}

/// A request for one named object.
struct ObjectCall<'a> {
    method: &'a str,
    kind: Resource,
    namespace: Option<&'a str>,
    name: &'a str,
    body: &'a [u8],
    field_manager: &'a str,
}

/// GET, or server-side apply (PATCH), of one object.
fn one_object(
    sock: &mut TcpStream,
    shared: &Arc<(Mutex<State>, Condvar)>,
    call: ObjectCall<'_>,
) -> std::io::Result<()> {
    let (m, cv) = &**shared;
    let ObjectCall {
        method,
        kind,
        namespace,
        name,
        body,
        field_manager,
    } = call;
    let key = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    };
    match method {
        "GET" => {
            let obj = m
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .objects
                .get(&(kind, key.clone()))
                .cloned();
            match obj {
                Some(o) => respond(sock, 200, "OK", &o),
                None => respond(
                    sock,
                    404,
                    "Not Found",
                    &status(404, "NotFound", &format!("{} \"{name}\" not found", kind.kind())),
                ),
            }
        }
        "PATCH" => {
            // Server-side apply with one field manager: the applied object is the object.
            let Ok(mut obj) = serde_json::from_slice::<Value>(body) else {
                return respond(sock, 400, "Bad Request", &status(400, "BadRequest", "not JSON"));
            };
            obj["metadata"]["name"] = json!(name);
            if let Some(ns) = namespace {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let stored = {
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                let created = !st.objects.contains_key(&(kind, key.clone()));
                st.patches.push(Patch {
                    at: Instant::now(),
                    kind,
                    key,
                    field_manager: field_manager.to_owned(),
                    body: obj.clone(),
                    created,
                });
                st.apply(kind, obj)
            };
            cv.notify_all();
            respond(sock, 200, "OK", &stored)
        }
        _ => respond(
            sock,
            405,
            "Method Not Allowed",
            &status(405, "MethodNotAllowed", "not in the double"),
        ),
    }
}

/// A list of one kind (under a namespace prefix), paged as kube-rs asks for it.
fn list(
    sock: &mut TcpStream,
    shared: &Arc<(Mutex<State>, Condvar)>,
    kind: Resource,
    prefix: &str,
    params: &BTreeMap<&str, &str>,
) -> std::io::Result<()> {
    let (m, cv) = &**shared;
    let st = m.lock().unwrap_or_else(|e| e.into_inner());
    // Pages: `limit` objects from the `continue` offset, as kube-rs asks for them.
    let offset: usize = params.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let all: Vec<&str> = st
        .rendered
        .range((kind, String::new())..)
        .take_while(|((k, _), _)| *k == kind)
        .filter(|((_, key), _)| key.starts_with(prefix))
        .map(|(_, v)| v.as_str())
        .collect();
    let items: Vec<&str> = all.iter().skip(offset).take(limit).copied().collect();
    let mut meta = json!({"resourceVersion": st.rv.to_string()});
    if offset.saturating_add(items.len()) < all.len() {
        meta["continue"] = json!((offset + items.len()).to_string());
    }
    let body = format!(
        "{{\"apiVersion\":\"{}\",\"kind\":\"{}List\",\"metadata\":{meta},\"items\":[{}]}}",
        kind.api_version(),
        kind.kind(),
        items.join(",")
    );
    drop(st);
    respond_raw(sock, 200, "OK", &body)?;
    cv.notify_all();
    Ok(())
}

fn watch(
    mut sock: TcpStream,
    shared: &Arc<(Mutex<State>, Condvar)>,
    stop: &AtomicBool,
    kind: Resource,
    prefix: &str,
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
        // Events of other namespaces are passed over, not sent.
        let scanned = st
            .history
            .iter()
            .filter(|(rv, k, ..)| *k == kind && *rv > from)
            .map(|(rv, ..)| *rv)
            .max();
        let events: Vec<(u64, &'static str, Value)> = st
            .history
            .iter()
            .filter(|(rv, k, ..)| *k == kind && *rv > from)
            .filter(|(.., obj)| key(obj).starts_with(prefix))
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
        from = from.max(scanned.unwrap_or(0));
        if bookmark {
            let obj = json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv_now.to_string()}});
            chunk(&mut sock, &json!({"type": "BOOKMARK", "object": obj}))?;
            from = from.max(rv_now);
        }
        st = m.lock().unwrap_or_else(|e| e.into_inner());
        // A watch that began as the API went down (its request was read just before) ends too.
        if stop.load(Ordering::Relaxed) || st.generation != generation || st.down {
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
