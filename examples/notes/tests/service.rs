//! The real `notes` binary, over a real SQLite file migrated with the shipped migrations,
//! through real HTTP on a loopback socket.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const CREATE_NOTES: &str = "20260101000000_create_notes.sql";
const ADD_TAGS: &str = "20260201000000_add_tags.sql";
const DROP_NOTE_TITLE: &str = "20260202000000_drop_note_title.sql";

/// A SQLite file in its own temp dir, migrated by running the migrations' sections.
struct Database {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Database {
    /// A database with the `up` sections of `migrations` applied, in order.
    fn migrated(migrations: &[&str]) -> Database {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.db");
        rusqlite::Connection::open(&path).unwrap();
        let database = Database { _dir: dir, path };
        for name in migrations {
            database.up(name);
        }
        database
    }

    fn url(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn up(&self, name: &str) {
        self.execute(section(name, "up"));
    }

    fn down(&self, name: &str) {
        self.execute(section(name, "down"));
    }

    /// Runs `sql` statement by statement (the shipped files hold no `;` inside statements).
    fn execute(&self, sql: &str) {
        let connection = rusqlite::Connection::open(&self.path).unwrap();
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            connection.execute(statement, []).unwrap_or_else(|e| panic!("`{statement}` failed: {e}"));
        }
    }

    fn columns(&self, table: &str) -> Vec<String> {
        let connection = rusqlite::Connection::open(&self.path).unwrap();
        let mut statement = connection.prepare(&format!("SELECT name FROM pragma_table_info('{table}')")).unwrap();
        statement.query_map([], |row| row.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }
}

/// The `up` or `down` section of a shipped migration, as exported by the library.
fn section(name: &str, which: &str) -> &'static str {
    let (_, text) = notes::MIGRATIONS.iter().find(|(file, _)| *file == name).expect("a shipped migration");
    let (_, after_up) = text.split_once("-- upshift:up\n").expect("an up marker");
    let (up, down) = after_up.split_once("-- upshift:down\n").expect("a down marker");
    if which == "up" { up } else { down }
}

/// A running `notes` process; killed when dropped.
struct Service {
    child: Child,
    address: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    fn start(release: &str, database: &Database) -> Service {
        Service::spawn(notes_command(release, Some(&database.url()))).unwrap_or_else(|log| panic!("{log}"))
    }

    /// Starts the command and waits for its `listening on` line; `Err` holds its stderr when
    /// it exited instead.
    fn spawn(mut command: Command) -> Result<Service, String> {
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (listening, address) = mpsc::channel();
        let lines = Arc::clone(&log);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, address)) = line.split_once(" listening on ") {
                    let _ = listening.send(address.parse::<SocketAddr>().unwrap());
                }
                lines.lock().unwrap().push(line);
            }
        });
        if let Ok(address) = address.recv_timeout(Duration::from_secs(20)) {
            return Ok(Service { child, address, log });
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        // The reader ends at the end of stderr: every line is collected.
        let _ = reader.join();
        Err(format!("notes did not start ({status}):\n{}", log.lock().unwrap().join("\n")))
    }

    fn client(&self) -> Client {
        Client::connect(self.address)
    }

    /// One request on a fresh connection.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let body = body.map(Value::to_string);
        self.client().send(method, path, &[("Connection", "close")], body.as_deref())
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(body))
    }

    fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "notes did not exit within {timeout:?}:\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "no `{needle}` in the log:\n{}", self.log());
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn notes_command(release: &str, database_url: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_notes"));
    command.args(["--release", release, "--listen", "127.0.0.1:0"]).env_remove("DATABASE_URL");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    command
}

/// An HTTP/1.1 client connection.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(address: SocketAddr) -> Client {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { reader: BufReader::new(stream) }
    }

    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Response {
        self.write(method, path, headers, body);
        self.read().expect("a response")
    }

    fn write(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (name, value) in headers {
            write!(request, "{name}: {value}\r\n").unwrap();
        }
        if let Some(body) = body {
            write!(request, "Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()).unwrap();
        }
        request.push_str("\r\n");
        request.push_str(body.unwrap_or_default());
        self.reader.get_mut().write_all(request.as_bytes()).unwrap();
    }

    /// The next response; `None` when the server closed the connection first.
    fn read(&mut self) -> Option<Response> {
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).unwrap() == 0 {
            return None;
        }
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect(&status_line);
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(header("content-type").as_deref(), Some("application/json"), "{status_line}");
        let length: usize = header("content-length").expect("a Content-Length").parse().unwrap();
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        let body: Value = serde_json::from_slice(&body).expect("a JSON body");
        Some(Response { status, headers, body })
    }

    /// Whether the server closed the connection (reads EOF).
    fn is_closed(&mut self) -> bool {
        let mut byte = [0; 1];
        matches!(self.reader.read(&mut byte), Ok(0))
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[track_caller]
    fn expect(self, status: u16) -> Value {
        assert_eq!(self.status, status, "unexpected response: {}", self.body);
        self.body
    }
}

#[test]
fn release_1_creates_and_lists_notes() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let service = Service::start("1.0.0", &database);

    assert_eq!(service.get("/health").expect(200), json!({"status": "ok", "release": "1.0.0"}));
    let first = service.post("/api/notes", &json!({"title": "first", "body": "hello"})).expect(201);
    assert_eq!(first, json!({"id": 1, "title": "first", "body": "hello"}));
    // 2.0.0's fields are ignored, so one client can talk to both releases.
    let second = service.post("/api/notes", &json!({"title": "second", "body": "world", "tags": ["x"]})).expect(201);
    assert_eq!(second, json!({"id": 2, "title": "second", "body": "world"}));
    assert_eq!(service.get("/api/notes").expect(200), json!([first, second]));
}

#[test]
fn release_2_stores_tags_after_the_expand_migration() {
    let database = Database::migrated(&[CREATE_NOTES, ADD_TAGS]);
    let service = Service::start("2.0.0", &database);

    assert_eq!(service.get("/health").expect(200), json!({"status": "ok", "release": "2.0.0"}));
    let tagged = service.post("/api/notes", &json!({"body": "hello", "tags": ["work", "home", "work"]})).expect(201);
    assert_eq!(tagged, json!({"id": 1, "body": "hello", "tags": ["home", "work"]}));
    // A title is accepted and ignored: 2.0.0 never writes notes.title.
    let plain = service.post("/api/notes", &json!({"title": "ignored", "body": "plain"})).expect(201);
    assert_eq!(plain, json!({"id": 2, "body": "plain", "tags": []}));
    assert_eq!(service.get("/api/notes").expect(200), json!([tagged, plain]));
}

#[test]
fn release_2_is_unhealthy_without_the_expand_migration() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let service = Service::start("2.0.0", &database);

    let health = service.get("/health").expect(503);
    assert_eq!(health["status"], "failing");
    assert_eq!(health["release"], "2.0.0");
    assert!(health["error"].as_str().unwrap().contains("tags"), "{health}");
}

#[test]
fn release_1_keeps_working_after_the_expand_migration() {
    let database = Database::migrated(&[CREATE_NOTES, ADD_TAGS]);
    // Both releases at once, as during a switch.
    let old = Service::start("1.0.0", &database);
    let new = Service::start("2.0.0", &database);

    assert_eq!(old.get("/health").expect(200)["status"], "ok");
    old.post("/api/notes", &json!({"title": "old", "body": "from 1.0.0"})).expect(201);
    new.post("/api/notes", &json!({"body": "from 2.0.0", "tags": ["new"]})).expect(201);

    assert_eq!(
        old.get("/api/notes").expect(200),
        json!([
            {"id": 1, "title": "old", "body": "from 1.0.0"},
            // The column's default: 2.0.0 does not write titles.
            {"id": 2, "title": "", "body": "from 2.0.0"},
        ])
    );
    assert_eq!(
        new.get("/api/notes").expect(200),
        json!([
            {"id": 1, "body": "from 1.0.0", "tags": []},
            {"id": 2, "body": "from 2.0.0", "tags": ["new"]},
        ])
    );
}

#[test]
fn release_2_works_after_the_contract_migration_and_its_down_brings_release_1_back() {
    let database = Database::migrated(&[CREATE_NOTES, ADD_TAGS]);
    {
        let old = Service::start("1.0.0", &database);
        old.post("/api/notes", &json!({"title": "kept?", "body": "before the contract"})).expect(201);
    }
    database.up(DROP_NOTE_TITLE);
    assert_eq!(database.columns("notes"), ["id", "body", "created_at"]);

    let new = Service::start("2.0.0", &database);
    assert_eq!(new.get("/health").expect(200)["status"], "ok");
    new.post("/api/notes", &json!({"body": "after the contract", "tags": ["b", "a"]})).expect(201);
    assert_eq!(
        new.get("/api/notes").expect(200),
        json!([
            {"id": 1, "body": "before the contract", "tags": []},
            {"id": 2, "body": "after the contract", "tags": ["a", "b"]},
        ])
    );

    // 1.0.0 needs the dropped column: its health check says so.
    let old = Service::start("1.0.0", &database);
    let health = old.get("/health").expect(503);
    assert!(health["error"].as_str().unwrap().contains("title"), "{health}");
    assert_eq!(old.get("/api/notes").status, 500);

    // The down section restores the column (not the titles), and 1.0.0 works again.
    database.down(DROP_NOTE_TITLE);
    assert_eq!(old.get("/health").expect(200)["status"], "ok");
    assert_eq!(old.get("/api/notes").expect(200)[1], json!({"id": 2, "title": "", "body": "after the contract"}));
    assert_eq!(new.get("/api/notes").expect(200).as_array().unwrap().len(), 2);
}

#[test]
fn release_3_serves_but_fails_its_health_check() {
    let database = Database::migrated(&[CREATE_NOTES, ADD_TAGS, DROP_NOTE_TITLE]);
    let service = Service::start("3.0.0", &database);

    assert_eq!(service.get("/health").expect(503), json!({"status": "failing", "release": "3.0.0"}));
    let note = service.post("/api/notes", &json!({"body": "still served", "tags": ["v3"]})).expect(201);
    assert_eq!(service.get("/api/notes").expect(200), json!([note]));
}

#[test]
fn health_fails_when_the_database_file_is_missing_and_does_not_create_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.db");
    let url = format!("sqlite://{}", path.display());
    let service = Service::spawn(notes_command("1.0.0", Some(&url))).unwrap();

    let health = service.get("/health").expect(503);
    assert_eq!(health["status"], "failing");
    assert!(health["error"].as_str().unwrap().contains("run the migrations"), "{health}");
    assert!(!Path::new(&path).exists());
}

#[test]
fn the_database_url_defaults_to_the_environment() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let mut command = notes_command("1.0.0", None);
    command.env("DATABASE_URL", database.url());
    let service = Service::spawn(command).unwrap();
    assert_eq!(service.get("/health").expect(200)["status"], "ok");
}

#[test]
fn usage_errors_exit_2() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let run = |mut command: Command| {
        let output = command.stdin(Stdio::null()).output().unwrap();
        (output.status.code(), String::from_utf8(output.stderr).unwrap())
    };

    let (code, stderr) = run(notes_command("4.0.0", Some(&database.url())));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unknown release `4.0.0`"), "{stderr}");

    let (code, stderr) = run(notes_command("1.0.0", None));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");

    let (code, stderr) = run(notes_command("1.0.0", Some("mysql://localhost/notes")));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unknown scheme"), "{stderr}");
}

#[test]
fn slow_sleeps_then_answers() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let service = Service::start("1.0.0", &database);

    let started = Instant::now();
    assert_eq!(service.get("/slow?ms=300").expect(200), json!({"slept_ms": 300}));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(service.get("/slow?ms=60001").expect(400)["error"].as_str().unwrap().contains("60000"));
    service.get("/slow").expect(400);
    service.get("/slow?ms=soon").expect(400);
}

#[test]
fn keep_alive_serves_two_requests_on_one_connection() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let service = Service::start("1.0.0", &database);
    let mut client = service.client();

    let first = client.send("POST", "/api/notes", &[], Some(r#"{"title":"a","body":"b"}"#));
    assert_eq!((first.status, first.header("connection")), (201, Some("keep-alive")));
    let second = client.send("GET", "/api/notes", &[], None);
    assert_eq!((second.status, second.header("connection")), (200, Some("keep-alive")));
    assert_eq!(second.body.as_array().unwrap().len(), 1);

    // Two requests in one write (pipelined) are answered in order.
    client.write("GET", "/slow?ms=1", &[], None);
    client.write("GET", "/health", &[], None);
    assert_eq!(client.read().unwrap().body, json!({"slept_ms": 1}));
    assert_eq!(client.read().unwrap().body["status"], "ok");

    // `Connection: close` is honoured.
    let last = client.send("GET", "/health", &[("Connection", "close")], None);
    assert_eq!((last.status, last.header("connection")), (200, Some("close")));
    assert!(client.is_closed());
}

#[test]
fn http_1_0_closes_unless_asked_to_keep_alive() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let service = Service::start("1.0.0", &database);
    let mut stream = TcpStream::connect(service.address).unwrap();
    stream.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("Connection: close\r\n"), "{text}");
}

#[test]
fn errors_are_json() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let service = Service::start("1.0.0", &database);

    let missing = service.get("/nowhere").expect(404);
    assert!(missing["error"].as_str().unwrap().contains("/nowhere"));

    let mut client = service.client();
    let bad = client.send("POST", "/api/notes", &[], Some("{not json"));
    assert!(bad.expect(400)["error"].as_str().unwrap().starts_with("invalid JSON"));
    let incomplete = client.send("POST", "/api/notes", &[], Some(r#"{"body":"no title"}"#));
    assert!(incomplete.expect(400)["error"].as_str().unwrap().contains("title"));
    // A 400 for a bad body keeps the connection usable.
    client.send("GET", "/health", &[], None).expect(200);

    let wrong_method = service.request("DELETE", "/api/notes", None);
    assert_eq!((wrong_method.status, wrong_method.header("allow")), (405, Some("GET, POST")));

    let mut client = service.client();
    client.write("POST", "/api/notes", &[("Transfer-Encoding", "chunked")], None);
    let chunked = client.read().unwrap();
    assert_eq!((chunked.status, chunked.header("connection")), (411, Some("close")));
    assert!(chunked.body["error"].as_str().unwrap().contains("Content-Length"));

    let mut stream = TcpStream::connect(service.address).unwrap();
    stream.write_all(b"garbage\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
}

#[test]
fn concurrent_inserts_from_two_releases_get_distinct_ids() {
    let database = Database::migrated(&[CREATE_NOTES, ADD_TAGS]);
    let old = Service::start("1.0.0", &database);
    let new = Service::start("2.0.0", &database);

    thread::scope(|scope| {
        for worker in 0..6 {
            let service = if worker % 2 == 0 { &old } else { &new };
            scope.spawn(move || {
                let mut client = service.client();
                for i in 0..15 {
                    let body = json!({"title": "t", "body": format!("{worker}-{i}"), "tags": ["load"]}).to_string();
                    client.send("POST", "/api/notes", &[], Some(&body)).expect(201);
                }
            });
        }
    });
    let notes = new.get("/api/notes").expect(200);
    let ids: Vec<i64> = notes.as_array().unwrap().iter().map(|n| n["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=90).collect::<Vec<_>>());
}

#[test]
fn sigterm_lets_a_request_in_flight_finish_then_exits_0() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let mut service = Service::start("1.0.0", &database);
    let address = service.address;

    let (accepted, wait_accepted) = mpsc::channel();
    let slow = thread::spawn(move || {
        let mut client = Client::connect(address);
        // A first request proves the connection was accepted before the stop.
        client.send("GET", "/health", &[], None).expect(200);
        accepted.send(()).unwrap();
        let started = Instant::now();
        let response = client.send("GET", "/slow?ms=1500", &[], None);
        (response, started.elapsed(), client.is_closed())
    });
    // Once the slow request is being served, ask the service to stop.
    wait_accepted.recv().unwrap();
    service.wait_for_log("slow request sleeping 1500 ms");
    service.terminate();
    service.wait_for_log("waiting for 1 open connection");
    // The listener is closed: new connections are refused while the old request finishes.
    assert!(TcpStream::connect(address).is_err(), "still accepting after SIGTERM");

    let (response, elapsed, closed) = slow.join().unwrap();
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.expect(200), json!({"slept_ms": 1500}));
    assert!(elapsed >= Duration::from_millis(1500));
    assert!(closed);
    let status = service.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", service.log());
    assert!(service.log().contains("SIGTERM received"));
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_and_exits_0() {
    let database = Database::migrated(&[CREATE_NOTES]);
    let mut service = Service::start("1.0.0", &database);
    let mut idle = service.client();
    idle.send("GET", "/health", &[], None).expect(200);

    let started = Instant::now();
    service.terminate();
    let status = service.wait(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", service.log());
    assert!(started.elapsed() < Duration::from_secs(3), "an idle connection held the stop back");
    assert!(idle.is_closed());
}

#[test]
fn the_shipped_migrations_are_exported_in_id_order() {
    assert_eq!(notes::RELEASES, ["1.0.0", "2.0.0", "3.0.0"]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    let exported: Vec<&str> = notes::MIGRATIONS.iter().map(|(name, _)| *name).collect();
    assert_eq!(exported, files);
    for (name, text) in notes::MIGRATIONS {
        assert_eq!(*text, std::fs::read_to_string(dir.join(name)).unwrap());
        let phase = if *name == DROP_NOTE_TITLE { "contract" } else { "expand" };
        assert!(text.contains(&format!("\n-- upshift:phase {phase}\n")), "{name} is not {phase}");
        assert!(!section(name, "up").trim().is_empty() && !section(name, "down").trim().is_empty(), "{name}");
    }
    // Going down through every migration leaves an empty database.
    let database = Database::migrated(&[CREATE_NOTES, ADD_TAGS, DROP_NOTE_TITLE]);
    for name in [DROP_NOTE_TITLE, ADD_TAGS, CREATE_NOTES] {
        database.down(name);
    }
    assert!(database.columns("notes").is_empty() && database.columns("tags").is_empty());
}
