//! `[verify] prometheus`: one PromQL query, one number, through Prometheus's HTTP API
//! (`GET /api/v1/query`), for the Kubernetes canary's verdict.

use std::time::Duration;

use serde::Deserialize;

#[derive(Deserialize)]
struct Answer {
    status: String,
    data: Option<Data>,
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<Sample>),
    Scalar((f64, String)),
    Matrix(serde::de::IgnoredAny),
    String(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Sample {
    value: (f64, String),
}

/// The value of `promql` now, from the server at `url`: `None` when it has no data (an
/// empty vector, or NaN, as a ratio over no requests is). More than one series is an error:
/// the query must come down to one number.
pub fn query(url: &str, promql: &str, timeout: Duration) -> Result<Option<f64>, String> {
    let address = format!("{url}/api/v1/query?query={}", crate::http::encode(promql));
    let answer = crate::http::get(&address, timeout).map_err(|e| format!("{url}: {e}"))?;
    read(&answer.body).map_err(|e| format!("{url} answered `{}`: {e}", answer.status_line))
}

fn read(body: &str) -> Result<Option<f64>, String> {
    let answer: Answer = serde_json::from_str(body).map_err(|e| format!("not Prometheus's JSON ({e})"))?;
    if answer.status != "success" {
        return Err(answer.error.unwrap_or(answer.status));
    }
    let text = match answer.data {
        Some(Data::Scalar((_, value))) => value,
        Some(Data::Vector(samples)) => match samples.as_slice() {
            [] => return Ok(None),
            [sample] => sample.value.1.clone(),
            more => return Err(format!("{} series, not one number (wrap the query in sum(...))", more.len())),
        },
        _ => return Err("not an instant vector or scalar".into()),
    };
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    Ok(if value.is_nan() { None } else { Some(value) })
}

#[cfg(test)]
mod tests {
    use super::read;

    #[test]
    fn answers_are_read_as_one_number_or_none() {
        let vector =
            |result: &str| format!(r#"{{"status":"success","data":{{"resultType":"vector","result":{result}}}}}"#);
        assert_eq!(read(&vector(r#"[{"metric":{},"value":[1764660000.5,"0.25"]}]"#)), Ok(Some(0.25)));
        assert_eq!(read(&vector("[]")), Ok(None));
        assert_eq!(read(&vector(r#"[{"metric":{},"value":[1,"NaN"]}]"#)), Ok(None));
        assert!(
            read(&vector(r#"[{"metric":{"a":"1"},"value":[1,"1"]},{"metric":{"a":"2"},"value":[1,"2"]}]"#))
                .is_err_and(|e| e.contains("2 series"))
        );
        assert_eq!(read(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"12"]}}"#), Ok(Some(12.0)));
        assert_eq!(
            read(r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#),
            Err("parse error at char 5".into())
        );
    }
}
