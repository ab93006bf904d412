//! Grafana dashboards (`dashboards/*.json`) cannot run here: every panel's SQL is run instead,
//! with the ClickHouse data source's macros expanded, against a database with the migrations
//! applied and a little usage in it. (schemas/tests/chdb_check.py runs them on current
//! ClickHouse too.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tollgate_e2e::*;

/// What grafana-clickhouse-datasource makes of its time macros.
fn expand(sql: &str, from: i64, to: i64) -> String {
    let mut out =
        sql.replace("$__fromTime", &format!("toDateTime({from})")).replace("$__toTime", &format!("toDateTime({to})"));
    while let Some(i) = out.find("$__timeFilter(") {
        let rest = &out[i + "$__timeFilter(".len()..];
        let end = rest.find(')').expect("closing parenthesis");
        let col = rest[..end].trim().to_owned();
        out = format!("{}{col} >= toDateTime({from}) AND {col} <= toDateTime({to}){}", &out[..i], &rest[end + 1..]);
    }
    assert!(!out.contains("$__"), "a macro is left: {out}");
    out
}

#[tokio::test]
async fn every_panel_query_runs_and_returns_rows() {
    let url = clickhouse();
    let db = unique("dash");
    ch(&url, &format!("CREATE DATABASE {db}")).await;
    let client = clickhouse::Client::default().with_url(&url).with_database(&db).with_validation(false);
    tollgate_schemas::migrate::run(&client).await.unwrap();
    let now = now_us() / 1_000_000;
    let minute = now - now % 60 - 120;
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.usage_minute (minute, consumer_id, route_id, outcome, status_class, requests, errors_4xx, errors_5xx, \
             request_bytes, response_bytes, latency_sum_us, latency_le_us, latency_count, version) VALUES \
             (toDateTime({minute}), 'acme', 'echo', 'forwarded', 2, 10, 0, 0, 0, 0, 20000, [1000, 3001], [8, 2], 1), \
             (toDateTime({minute}), 'acme', 'echo', 'forwarded', 5, 2, 0, 2, 0, 0, 9000, [4503], [2], 1)"
        ),
    )
    .await;
    let period = tollgate_common::time::month_label(now);
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.quota_state (consumer_id, period, plan_id, quota, used, status, enforcement, warning_percent, \
             period_start, period_end, covered_until, computed_at_us) VALUES \
             ('acme', '{period}', 'free', 100, 12, 'ok', 'hard', 80, toDateTime({minute}), toDateTime({minute}), toDateTime({minute}), 1)"
        ),
    )
    .await;
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.slo_burn_rate (minute, slo_id, consumer_id, window_minutes, total, bad, burn_rate, evaluated_at_us) \
             VALUES (toDateTime({minute}), 'api', '', 60, 12, 2, 16.7, 1), (toDateTime({minute}), 'api', '', 5, 12, 2, 16.7, 1)"
        ),
    )
    .await;
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.slo_alerts (at, at_us, alert_id, slo_id, consumer_id, severity, status, window_end, \
             long_window_minutes, short_window_minutes, burn_rate_threshold, long_burn_rate, short_burn_rate, delivered) \
             VALUES (toDateTime({minute}), {minute}000000, 'api/page/60m-5m', 'api', '', 'page', 'firing', toDateTime({minute}), \
             60, 5, 14.4, 16.7, 16.7, 1)"
        ),
    )
    .await;
    // Three calls to two targets of a route (one 502 from the canary), one refused at the edge.
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.api_calls (event_id, ts, route_id, status, outcome, latency_us, upstream_target) VALUES \
             ('00000000-0000-0000-0000-000000000001', toDateTime({minute}), 'echo', 200, 'forwarded', 1000, 'http://stable:80'), \
             ('00000000-0000-0000-0000-000000000002', toDateTime({minute}), 'echo', 200, 'forwarded', 3000, 'http://stable:80'), \
             ('00000000-0000-0000-0000-000000000003', toDateTime({minute}), 'echo', 502, 'upstream_error', 5000, 'http://canary:80'), \
             ('00000000-0000-0000-0000-000000000004', toDateTime({minute}), 'echo', 401, 'unauthenticated', 10, '')"
        ),
    )
    .await;
    // Three gRPC calls: two UNAVAILABLE (metered 503), one OK.
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.api_calls (event_id, ts, route_id, status, outcome, latency_us, grpc_status) VALUES \
             ('00000000-0000-0000-0000-000000000011', toDateTime({minute}), 'grpc', 503, 'forwarded', 2000, 14), \
             ('00000000-0000-0000-0000-000000000012', toDateTime({minute}), 'grpc', 503, 'forwarded', 4000, 14), \
             ('00000000-0000-0000-0000-000000000013', toDateTime({minute}), 'grpc', 200, 'forwarded', 1000, 0)"
        ),
    )
    .await;
    let mut ran = 0;
    for entry in std::fs::read_dir(repo_root().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let sql = expand(target["rawSql"].as_str().unwrap(), now - 3600, now);
                let rows = try_ch(
                    &url,
                    &format!("{sql}\nFORMAT TSV")
                        .replace("FROM usage_minute_final", &format!("FROM {db}.usage_minute_final"))
                        .replace("FROM quota_state", &format!("FROM {db}.quota_state"))
                        .replace("FROM slo_", &format!("FROM {db}.slo_"))
                        .replace("FROM api_calls_unique", &format!("FROM {db}.api_calls_unique")),
                )
                .await
                .unwrap_or_else(|e| panic!("{}: panel `{}`: {e}\n{sql}", path.display(), panel["title"]));
                assert!(!rows.trim().is_empty(), "panel `{}` returned nothing", panel["title"]);
                ran += 1;
            }
        }
    }
    assert!(ran >= 9, "{ran} panel queries");
    // The firing-alerts panel is the documented query.
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("dashboards/tollgate-usage.json")).unwrap())
            .unwrap();
    let doc = std::fs::read_to_string(repo_root().join("schemas/queries/slo_alerts_firing.sql")).unwrap();
    let doc = doc.lines().filter(|l| !l.starts_with("--")).collect::<Vec<_>>().join("\n");
    let panel = dash["panels"].as_array().unwrap().iter().find(|p| p["title"] == "SLO alerts firing now").unwrap();
    assert_eq!(panel["targets"][0]["rawSql"].as_str().unwrap(), doc.trim());
    // The latency table's percentiles come from the merged buckets: 12 calls → P50 is the
    // 6th (1.0 ms bucket), P95 and P99 the 12th (4.503 ms).
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("dashboards/tollgate-usage.json")).unwrap())
            .unwrap();
    let table =
        dash["panels"].as_array().unwrap().iter().find(|p| p["title"] == "Usage by consumer over the window").unwrap();
    let sql = expand(table["targets"][0]["rawSql"].as_str().unwrap(), now - 3600, now)
        .replace("FROM usage_minute_final", &format!("FROM {db}.usage_minute_final"));
    let row =
        ch(&url, &format!("SELECT consumer, calls, errors_5xx, p50_ms, p95_ms, p99_ms FROM ({sql}) FORMAT TSV")).await;
    assert_eq!(row.trim(), "acme\t12\t2\t1\t4.503\t4.503");
    // Per target: the canary's error share beside the stable target's; the refused call is not
    // a target's.
    let table = dash["panels"].as_array().unwrap().iter().find(|p| p["id"] == 11).unwrap();
    let sql = expand(table["targets"][0]["rawSql"].as_str().unwrap(), now - 3600, now)
        .replace("FROM api_calls_unique", &format!("FROM {db}.api_calls_unique"));
    let rows = ch(&url, &format!("{sql}\nFORMAT TSV")).await;
    assert_eq!(rows.trim(), "echo\thttp://canary:80\t1\t1\t100\t5\t5\necho\thttp://stable:80\t2\t0\t0\t3\t3");
    // gRPC: one row per code, with the HTTP status it was metered as; other calls are left out.
    let table = dash["panels"].as_array().unwrap().iter().find(|p| p["id"] == 12).unwrap();
    let sql = expand(table["targets"][0]["rawSql"].as_str().unwrap(), now - 3600, now)
        .replace("FROM api_calls_unique", &format!("FROM {db}.api_calls_unique"));
    let rows = ch(&url, &format!("{sql}\nFORMAT TSV")).await;
    assert_eq!(rows.trim(), "grpc\t0\t200\t1\t1\ngrpc\t14\t503\t2\t4");
    ch(&url, &format!("DROP DATABASE {db}")).await;
}
