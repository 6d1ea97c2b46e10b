//! A real Prometheus server for tests of the chart's dashboards and alert
//! rules: started on loopback with a test copy of `alerts/synod-rules.yaml`,
//! queried through its HTTP API, and every panel of a Grafana dashboard
//! evaluated against it. Shared by the broker's and the operator's
//! dashboard tests (the operator's includes this file by path). Must not
//! fake Prometheus: `prometheus` and `promtool` come from Debian's
//! `prometheus` package (scripts/debian-packages.txt).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Upper bound for any single wait: Prometheus starting and scraping, a
/// cluster forming, an alert going from pending to firing.
pub const WAIT: Duration = Duration::from_secs(60);

/// How often Prometheus scrapes and evaluates rules here.
pub const SCRAPE_INTERVAL: &str = "1s";

/// What `$__rate_interval` stands for. Grafana makes it at least four scrape
/// intervals; a little more keeps `rate()` from coming back empty when one
/// scrape of a loaded machine is late.
pub const RATE_INTERVAL: &str = "10s";

/// `for:` of every alert in the test copy of the rules, so that an alert
/// fires within seconds of its condition becoming true.
pub const TEST_FOR: &str = "2s";

/// Samples each target must have within [`RATE_INTERVAL`] before dashboards
/// are queried: two make a rate, the rest absorb late scrapes.
pub const SCRAPES_BEFORE_QUERIES: u32 = 5;

/// The path of a Debian `prometheus` tool, or a panic saying how to get it.
pub fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: install Debian's `prometheus` package \
             (listed in scripts/debian-packages.txt; scripts/install-deps.sh does it)"
        )
    })
}

/// `charts/synod`, from either crate (both sit at the repository root).
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/synod")
}

/// A loopback port free right now.
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, unique directory.
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "synod-dashboards-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP client for loopback only.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Waits until `check` returns `Some`, polling; panics naming `what` after [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Percent-encodes everything but unreserved characters, for query strings.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One `scrape_configs` entry: `targets` with static target labels, as a
/// PodMonitor's relabeling would give them.
pub fn scrape_job(job: &str, targets: &[String], labels: &[(&str, &str)]) -> String {
    let targets = targets
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let labels: String = labels
        .iter()
        .map(|(name, value)| format!("          {name}: '{value}'\n"))
        .collect();
    format!(
        "  - job_name: {job}\n    static_configs:\n      - targets: [{targets}]\n        labels:\n{labels}"
    )
}

/// The alert rules as shipped, with every `for:` shortened to [`TEST_FOR`].
pub fn rules_with_short_for(original: &str) -> String {
    original
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("for:") {
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}for: {TEST_FOR}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect()
}

/// Fails the test unless `promtool check rules` accepts `path`.
pub fn promtool_check_rules(path: &Path) {
    let output = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(path)
        .output()
        .expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check rules {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes the test copy of the chart's rules into `dir` after promtool has
/// accepted both the original and the copy; returns the copy's path.
pub fn test_rules(dir: &Path) -> PathBuf {
    let original = chart_dir().join("alerts/synod-rules.yaml");
    let copy = dir.join("synod-rules.yaml");
    std::fs::write(
        &copy,
        rules_with_short_for(&std::fs::read_to_string(&original).expect("read rules")),
    )
    .expect("write test rules");
    promtool_check_rules(&original);
    promtool_check_rules(&copy);
    copy
}

/// The Prometheus server a test started, killed (only it) on drop.
pub struct Prometheus {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus in `dir` with `scrape_configs` (entries from
    /// [`scrape_job`]) and the rule file `rules`.
    pub fn start(dir: &Path, scrape_configs: &[String], rules: &Path) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
                 rule_files:\n  - '{}'\nscrape_configs:\n{}",
                rules.display(),
                scrape_configs.concat()
            ),
        )
        .expect("write prometheus.yml");
        let web_port = free_loopback_port();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{web_port}"),
            http: http_client(),
        }
    }

    /// GETs an API path; the decoded body, whatever the status.
    pub async fn api(&self, path_and_query: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// An instant query: the result vector, or the error Prometheus gave.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let body = self
            .api(&format!("/api/v1/query?query={}", encode(promql)))
            .await
            .ok_or_else(|| "no answer from prometheus".to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        body["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("not a vector: {body}"))
    }

    /// The single value of a query that returns exactly one series.
    pub async fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await.ok()?;
        match result.as_slice() {
            [series] => series["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits until `targets` targets of `job` are up and each has
    /// [`SCRAPES_BEFORE_QUERIES`] samples within [`RATE_INTERVAL`].
    pub async fn wait_scraped(&self, job: &str, targets: usize) {
        wait_for(
            &format!("{targets} targets of {job} up and scraped"),
            || async {
                let up = self
                    .scalar(&format!("count(up{{job=\"{job}\"}} == 1)"))
                    .await?;
                let scrapes = self
                    .scalar(&format!(
                        "min(count_over_time(up{{job=\"{job}\"}}[{RATE_INTERVAL}]))"
                    ))
                    .await?;
                (up == targets as f64 && scrapes >= f64::from(SCRAPES_BEFORE_QUERIES)).then_some(())
            },
        )
        .await;
    }

    /// Waits until every loaded rule has been evaluated, then fails the
    /// test if any evaluation failed; returns the rules' names.
    pub async fn assert_rules_evaluate(&self) -> BTreeSet<String> {
        let health = wait_for("every rule evaluated", || async {
            let body = self.api("/api/v1/rules").await?;
            let mut health = BTreeMap::new();
            for group in body["data"]["groups"].as_array()? {
                for rule in group["rules"].as_array()? {
                    let name = rule["name"].as_str()?.to_string();
                    let state = rule["health"].as_str()?.to_string();
                    if state == "unknown" {
                        return None;
                    }
                    health.insert(name, (state, rule["lastError"].clone()));
                }
            }
            (!health.is_empty()).then_some(health)
        })
        .await;
        for (name, (state, error)) in &health {
            assert_eq!(state, "ok", "rule {name} failed to evaluate: {error}");
        }
        health.into_keys().collect()
    }

    /// Alerts in `state` (`pending` or `firing`) named `name`, by their labels.
    pub async fn alerts(&self, name: &str, state: &str) -> Vec<Value> {
        let body = self.api("/api/v1/alerts").await.unwrap_or(Value::Null);
        body["data"]["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .filter(|a| a["labels"]["alertname"] == name && a["state"] == state)
                    .map(|a| a["labels"].clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until alert `name` fires with `labels` among its labels.
    pub async fn wait_firing(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        wait_for(&format!("alert {name} {labels:?} to fire"), || async {
            self.alerts(name, "firing").await.into_iter().find(|a| {
                labels
                    .iter()
                    .all(|(label, value)| a[*label].as_str() == Some(value))
            })
        })
        .await
    }

    /// Names of the alerts pending or firing.
    pub async fn active_alert_names(&self) -> BTreeSet<String> {
        let body = self.api("/api/v1/alerts").await.unwrap_or(Value::Null);
        body["data"]["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The values Grafana variables take in a test: the dashboard's own
/// variables (`namespace`, `cluster`) as given, the built-in intervals what
/// Grafana would compute for a one-second scrape (see [`RATE_INTERVAL`]).
pub fn variable_values(
    own: &[(&'static str, &'static str)],
) -> BTreeMap<&'static str, &'static str> {
    let mut values = BTreeMap::from([
        ("__rate_interval", RATE_INTERVAL),
        ("__interval", SCRAPE_INTERVAL),
        ("__range", "1h"),
    ]);
    values.extend(own.iter().copied());
    values
}

/// `text` with every Grafana variable (`$name`, `${name}`, `[[name]]`)
/// replaced; `Err` names a variable left over.
pub fn substitute(text: &str, values: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut values: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, *v)).collect();
    // Longest names first, so that a name cannot eat part of a longer one.
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = text.to_string();
    for (name, value) in values {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("[[{name}]]"), value)
            .replace(&format!("${name}"), value);
    }
    if out.contains('$') || out.contains("[[") {
        return Err(format!("unknown Grafana variable left in {out:?}"));
    }
    Ok(out)
}

/// One query target of one panel.
pub struct PanelQuery {
    /// The panel's title.
    pub panel: String,
    /// The target's PromQL, variables not yet substituted.
    pub expr: String,
}

/// Every panel target of a dashboard, rows' nested panels included.
pub fn panel_queries(board: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &Value, out: &mut Vec<PanelQuery>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(PanelQuery {
                        panel: title.to_string(),
                        expr: expr.to_string(),
                    });
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&board["panels"], &mut out);
    out
}

/// What checking one dashboard found.
#[derive(Default)]
pub struct DashboardCheck {
    /// Problems: invalid queries, empty panels not allowed to be empty,
    /// variables that do not offer the expected value.
    pub failures: Vec<String>,
    /// One line per panel target: how many series it returned.
    pub report: Vec<String>,
}

/// Evaluates dashboard `file` (relative to the chart) against `prometheus`:
/// each `label_values` variable must offer the value in `values`, each panel
/// target must be a valid instant query returning series, unless its panel
/// title is in `expected_empty` (title, why).
pub async fn check_dashboard(
    prometheus: &Prometheus,
    file: &str,
    values: &BTreeMap<&str, &str>,
    expected_empty: &[(&str, &str)],
) -> DashboardCheck {
    let mut check = DashboardCheck::default();
    let board: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join(file)).expect("read dashboard"),
    )
    .expect("dashboard is JSON");
    for variable in board["templating"]["list"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().unwrap_or_default();
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap_or_default();
        let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            continue;
        };
        let Some((selector, label)) = args.rsplit_once(',') else {
            check
                .failures
                .push(format!("{file}: variable ${name}: cannot read {query}"));
            continue;
        };
        let selector = match substitute(selector.trim(), values) {
            Ok(selector) => selector,
            Err(err) => {
                check
                    .failures
                    .push(format!("{file}: variable ${name}: {err}"));
                continue;
            }
        };
        let label = label.trim();
        let series = prometheus
            .api(&format!("/api/v1/series?match[]={}", encode(&selector)))
            .await
            .unwrap_or(Value::Null);
        let offered: BTreeSet<&str> = series["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[label].as_str())
            .collect();
        let expected = values.get(name).copied().unwrap_or_default();
        if !offered.contains(expected) {
            check.failures.push(format!(
                "{file}: variable ${name} ({query}) offers {offered:?}, not {expected:?}"
            ));
        }
    }
    for target in panel_queries(&board) {
        let expr = match substitute(&target.expr, values) {
            Ok(expr) => expr,
            Err(err) => {
                check
                    .failures
                    .push(format!("{file}: panel {:?}: {err}", target.panel));
                continue;
            }
        };
        match prometheus.query(&expr).await {
            Err(err) => check.failures.push(format!(
                "{file}: panel {:?}: invalid query {expr}: {err}",
                target.panel
            )),
            Ok(result) => {
                let why_empty = expected_empty
                    .iter()
                    .find(|(panel, _)| *panel == target.panel)
                    .map(|(_, why)| *why);
                if result.is_empty() && why_empty.is_none() {
                    check.failures.push(format!(
                        "{file}: panel {:?}: no series for {expr}",
                        target.panel
                    ));
                }
                check.report.push(format!(
                    "{file}: {:?}: {} series{}",
                    target.panel,
                    result.len(),
                    why_empty
                        .map(|why| format!(" (may be empty: {why})"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    check
}

#[test]
fn grafana_variables_are_substituted_or_refused() {
    // Goal: known variables in all three spellings are replaced; an unknown one is an error.
    let values = variable_values(&[("namespace", "ns"), ("cluster", "c")]);
    assert_eq!(
        substitute(
            "rate(x{a=~\"$namespace\",b=\"${cluster}\"}[[[__rate_interval]]])",
            &values
        ),
        Ok(format!("rate(x{{a=~\"ns\",b=\"c\"}}[{RATE_INTERVAL}])"))
    );
    assert!(substitute("x{node=\"$node\"}", &values).is_err());
}

#[test]
fn the_test_copy_of_the_rules_only_shortens_for() {
    // Goal: every `for:` becomes TEST_FOR with its indentation; other lines stay.
    let original = "rules:\n  - alert: A\n    expr: up == 0\n    for: 15m\n";
    assert_eq!(
        rules_with_short_for(original),
        format!("rules:\n  - alert: A\n    expr: up == 0\n    for: {TEST_FOR}\n")
    );
}
