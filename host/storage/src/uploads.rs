//! Listing the multipart uploads under way under a prefix (S3's
//! `ListMultipartUploads`, which `object_store` does not offer): a GET
//! signed with the store's own credentials (SigV4 by `object_store`'s
//! `AwsAuthorizer`), its XML answer read with `quick-xml`. A job sweeps
//! its output prefix with it, so an attempt killed mid-upload leaves no
//! upload behind.

use std::io;

use mr_core::location::ObjectUrl;
use object_store::aws::AwsAuthorizer;
use object_store::client::HttpRequestBody;
use serde::Deserialize;

use crate::Bucket;

/// Percent-encodes all but RFC 3986's unreserved characters, as SigV4's
/// canonical query does.
fn strict(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// Pages of 1000 at most (S3's own limit), and at most this many pages:
/// a prefix with millions of uploads is not ours to sweep.
const MAX_PAGES: usize = 1000;

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Answer {
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_upload_id_marker: Option<String>,
    #[serde(rename = "Upload")]
    uploads: Vec<Entry>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Entry {
    key: String,
    upload_id: String,
}

/// The uploads under way whose key starts with `prefix.key`.
///
/// Fails when the request fails or its answer cannot be read.
pub(crate) async fn list(b: &Bucket, prefix: &ObjectUrl) -> io::Result<Vec<(ObjectUrl, String)>> {
    let shown = prefix.to_string();
    let fail =
        |what: String| io::Error::other(format!("{shown}: cannot list multipart uploads: {what}"));
    let credential =
        b.s3.credentials()
            .get_credential()
            .await
            .map_err(|e| fail(e.to_string()))?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut found = Vec::new();
    let mut markers: Option<(String, String)> = None;
    for _ in 0..MAX_PAGES {
        // The query exactly as SigV4 signs it: sorted, each value
        // percent-encoded but for unreserved characters; keys in the
        // answer URL-encoded (so no key can break its XML).
        let mut query = vec![
            ("encoding-type", "url".to_string()),
            ("prefix", prefix.key.clone()),
            ("uploads", String::new()),
        ];
        if let Some((k, u)) = &markers {
            query.push(("key-marker", k.clone()));
            query.push(("upload-id-marker", u.clone()));
        }
        query.sort();
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", strict(v)))
            .collect();
        let url = url::Url::parse(&format!("{}/?{}", b.url, query.join("&")))
            .map_err(|e| fail(e.to_string()))?;
        // `?uploads=` and `?uploads` are the same request to S3; SigV4
        // signs the query as sent.
        let mut request = http::Request::builder()
            .method(http::Method::GET)
            .uri(url.as_str())
            .body(HttpRequestBody::empty())
            .map_err(|e| fail(e.to_string()))?;
        AwsAuthorizer::new(&credential, "s3", &b.region)
            .try_authorize(&mut request, None)
            .map_err(|e| fail(e.to_string()))?;
        let mut send = client.get(url.as_str());
        for (k, v) in request.headers() {
            send = send.header(k, v);
        }
        let answer = send.send().await.map_err(|e| fail(e.to_string()))?;
        let status = answer.status();
        let body = answer.text().await.map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!(
                "{status}: {}",
                body.chars().take(500).collect::<String>()
            )));
        }
        let page: Answer = quick_xml::de::from_str(&body).map_err(|e| fail(e.to_string()))?;
        for e in page.uploads {
            if e.key.starts_with(&prefix.key) {
                found.push((
                    ObjectUrl {
                        bucket: prefix.bucket.clone(),
                        key: e.key,
                    },
                    e.upload_id,
                ));
            }
        }
        match (
            page.is_truncated,
            page.next_key_marker,
            page.next_upload_id_marker,
        ) {
            (true, Some(k), Some(u)) => markers = Some((k, u)),
            _ => return Ok(found),
        }
    }
    Err(fail(format!("more than {} pages", MAX_PAGES)))
}
