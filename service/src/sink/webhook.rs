//! The webhook's body: the batch's [`v1::ExportRecord`]s in the proto3 JSON
//! mapping (the export file's schema), as one JSON array
//! (`application/json`, the default) or one record a line
//! (`application/x-ndjson`, `--webhook-format ndjson`).

use hyper::body::Bytes;
use proto::v1;

/// The webhook's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookFormat {
    /// One JSON array of records (`application/json`).
    JsonArray,
    /// One record a line (`application/x-ndjson`).
    JsonLines,
}

/// The body and its content type.
pub fn encode(records: &[&v1::ExportRecord], format: WebhookFormat) -> (Bytes, &'static str) {
    let mut out = Vec::with_capacity(records.len() * 512);
    let json = |out: &mut Vec<u8>, r: &v1::ExportRecord| {
        // Serializing a generated message into memory cannot fail.
        let _ = serde_json::to_writer(&mut *out, r);
    };
    match format {
        WebhookFormat::JsonArray => {
            out.push(b'[');
            for (i, r) in records.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json(&mut out, r);
            }
            out.push(b']');
            (Bytes::from(out), "application/json")
        }
        WebhookFormat::JsonLines => {
            for r in records {
                json(&mut out, r);
                out.push(b'\n');
            }
            (Bytes::from(out), "application/x-ndjson")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::export_record::Record;

    fn rec(seq: u64) -> v1::ExportRecord {
        v1::ExportRecord {
            version: 1,
            record_seq: seq,
            record: Some(Record::Event(v1::Event {
                seq,
                text: format!("ev \"{seq}\"\n"),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn array_and_lines_read_back_into_the_records() {
        let recs = [rec(1), rec(2), rec(3)];
        let refs: Vec<&v1::ExportRecord> = recs.iter().collect();
        let (body, ctype) = encode(&refs, WebhookFormat::JsonArray);
        assert_eq!(ctype, "application/json");
        let back: Vec<v1::ExportRecord> = serde_json::from_slice(&body).unwrap();
        assert_eq!(back, recs);
        let (body, ctype) = encode(&refs, WebhookFormat::JsonLines);
        assert_eq!(ctype, "application/x-ndjson");
        let text = std::str::from_utf8(&body).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        let back: Vec<v1::ExportRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, recs);
        // 64-bit integers are strings, as the mapping prescribes.
        assert!(text.starts_with(r#"{"version":1,"#), "{text}");
        assert!(text.contains(r#""recordSeq":"1""#), "{text}");
    }
}
