//! The console in a real browser: headless Chromium, driven over the DevTools protocol on
//! a pipe (`--remote-debugging-pipe`: two FIFOs, no WebSocket client needed), loads the
//! pages, reads their DOM, clicks the dead-letter page's Replay button as an operator
//! would, and takes screenshots (`CONSOLE_SCREENSHOTS=docs cargo test --test api
//! console_browser` redraws the README's, `docs/console-*.png`).
//!
//! Nothing sleeps: every step waits for the browser's answer or its `load` event, each
//! with a deadline. Skipped, with a message, only when `chromium` is not installed and
//! `CI` is not set.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::console::{add_dead_letter, console_url};
use crate::helpers::*;

/// How long one browser step may take.
const STEP: Duration = Duration::from_secs(20);

/// A headless Chromium with one page, spoken to over the DevTools pipe.
struct Browser {
    child: Child,
    commands: std::fs::File,
    messages: mpsc::Receiver<Value>,
    session: String,
    next_id: u64,
    _dir: tempfile::TempDir,
}

impl Browser {
    fn start(chromium: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let to_browser = dir.path().join("in");
        let from_browser = dir.path().join("out");
        for fifo in [&to_browser, &from_browser] {
            assert!(Command::new("mkfifo").arg(fifo).status().unwrap().success());
        }
        // The browser reads commands on fd 3 and writes answers on fd 4.
        let child = Command::new("bash")
            .arg("-c")
            .arg(r#"exec "$0" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking --disable-component-update --disable-sync --disable-dev-shm-usage --hide-scrollbars --remote-debugging-pipe --user-data-dir="$1/profile" 3<"$1/in" 4>"$1/out""#)
            .arg(chromium)
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromium starts");
        // Opening a FIFO waits for its other end: the browser opens both as it starts.
        let commands = std::fs::OpenOptions::new()
            .write(true)
            .open(&to_browser)
            .unwrap();
        let output = std::fs::File::open(&from_browser).unwrap();
        let (sender, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).unwrap_or(0) > 0 {
                message.pop_if(|b| *b == 0);
                if let Ok(value) = serde_json::from_slice::<Value>(&message) {
                    if sender.send(value).is_err() {
                        return;
                    }
                }
                message.clear();
            }
        });
        let mut browser = Self {
            child,
            commands,
            messages,
            session: String::new(),
            next_id: 0,
            _dir: dir,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser.call("Page.enable", json!({}));
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser
    }

    /// Sends one command (to the page once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        let answer = self.wait_for(&format!("the answer to {method}"), |m| m["id"] == id);
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    fn wait_for(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(m) if wanted(&m) => return m,
                Ok(_) => {}
                Err(_) => panic!("chromium: timed out waiting for {what}"),
            }
        }
    }

    /// Runs `action` and waits for the page's next `load`.
    fn until_loaded(&mut self, action: impl FnOnce(&mut Self)) {
        action(self);
        self.wait_for("the page to load", |m| m["method"] == "Page.loadEventFired");
    }

    fn open(&mut self, url: &str) {
        self.until_loaded(|b| {
            b.call("Page.navigate", json!({"url": url}));
        });
    }

    /// Clicks the element `selector` finds, as a user would (it submits its form).
    fn click(&mut self, selector: &str) {
        let expression = format!(
            "document.querySelector({}).click()",
            serde_json::to_string(selector).unwrap()
        );
        self.until_loaded(|b| {
            b.call("Runtime.evaluate", json!({"expression": expression}));
        });
    }

    fn dom(&mut self) -> String {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": "document.documentElement.outerHTML", "returnByValue": true}),
        );
        result["result"]["value"].as_str().unwrap().to_string()
    }

    fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// Where the screenshots go: `CONSOLE_SCREENSHOTS` (relative to the repository: `docs`
/// redraws the README's), else `scratch`, so a test run leaves the repository as it was.
fn screenshot_folder(scratch: &Path) -> std::path::PathBuf {
    match std::env::var_os("CONSOLE_SCREENSHOTS") {
        Some(dir) => Path::new(env!("CARGO_MANIFEST_DIR")).join(dir),
        None => scratch.to_path_buf(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_replays_a_poison_entry_from_the_dead_letter_page() {
    let Some(chromium) = chromium_or_skip("console browser test") else {
        return;
    };
    let app = spawn_app().await;
    for user in ["alice", "bob"] {
        let response = app
            .ensure(&token(user, &format!("{user}@example.com")))
            .await;
        assert_eq!(response.status(), 200);
    }
    refuse_poison(&app.db_path);
    let response = app.ensure(&token("poison", "poison@example.com")).await;
    assert_eq!(response.status(), 500);
    let dead = app.queue.entries("stream:ensure-user:dead").await;
    assert_eq!(dead.len(), 1);
    let dead_id = dead[0].id.clone();
    // A second letter, written as a worker would, that stays: the page shows several.
    add_dead_letter(&app.queue, "mallory").await;

    // The screenshots go to a scratch folder, or where CONSOLE_SCREENSHOTS says (`docs` to
    // redraw the README's): a test run leaves the repository as it was.
    let scratch = tempfile::tempdir().unwrap();
    let docs = screenshot_folder(scratch.path());
    let overview_url = console_url(&app, "/console/");
    let letters_url = console_url(&app, "/console/dead-letters");
    let lookup_url = console_url(&app, "/console/requests?q=poison");
    let db = app.db_path.clone();
    let repaired = move || repair_poison(&db);
    let (before, lookup, after) = tokio::task::spawn_blocking(move || {
        let mut browser = Browser::start(&chromium);
        browser.open(&overview_url);
        browser.screenshot(&docs.join("console-overview.png"));
        browser.open(&lookup_url);
        let lookup = browser.dom();
        browser.screenshot(&docs.join("console-requests.png"));
        browser.open(&letters_url);
        let before = browser.dom();
        browser.screenshot(&docs.join("console-dead-letters.png"));
        // The operator repairs what was wrong, then clicks the letter's Replay button.
        repaired();
        browser.click(&format!("tr[data-id=\"{dead_id}\"] button[name=\"one\"]"));
        let after = browser.dom();
        browser.screenshot(&docs.join("console-replayed.png"));
        (before, lookup, after)
    })
    .await
    .unwrap();

    let dead_id = &dead[0].id;
    assert!(
        before.contains(&format!("<tr data-id=\"{dead_id}\">")),
        "{before}"
    );
    assert!(before.contains("<code>poison</code>"), "{before}");
    assert!(before.contains("refused by the test"), "{before}");
    // The other letter's reason is shown as text, never as markup.
    assert!(
        before.contains("refused: &lt;b&gt;by the test&lt;/b&gt;"),
        "{before}"
    );
    assert!(lookup.contains("No row in sqlite for poison"), "{lookup}");
    assert!(lookup.contains("refused by the test"), "{lookup}");
    assert!(
        after.contains(&format!("replayed {dead_id} on stream:ensure-user as ")),
        "{after}"
    );
    assert!(after.contains("1 of 1 replayed"), "{after}");
    assert!(
        !after.contains(&format!("<tr data-id=\"{dead_id}\">")),
        "{after}"
    );
    // Moved back: off the dead letters, onto the ingress stream, and carried out.
    eventually("the replayed user to be stored", || async {
        app.rows().iter().any(|(u, _)| u == "poison").then_some(())
    })
    .await;
    let left = app.queue.entries("stream:ensure-user:dead").await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].field("user_id"), Some(&b"mallory"[..]));
    app.shutdown().await.unwrap();
}
