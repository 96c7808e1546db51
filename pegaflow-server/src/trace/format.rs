//! The trace format: JSON Lines, one request per line, as public production KV-cache
//! traces publish it:
//! `{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [int, ...]}`.
//! Each hash id names one block of [`TOKENS_PER_BLOCK`] tokens; a request's ids form
//! its prefix chain.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

/// Tokens one hash id stands for in the public traces.
pub const TOKENS_PER_BLOCK: u64 = 512;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival time, milliseconds.
    #[serde(default)]
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Generated tokens.
    #[serde(default)]
    pub output_length: u64,
    /// The prompt's blocks, in chain order.
    pub hash_ids: Vec<u64>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading failed.
    #[error("cannot read the trace: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not a request.
    #[error("line {line}: {source}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        source: serde_json::Error,
    },
    /// Nothing to replay.
    #[error("the trace holds no requests")]
    Empty,
}

/// Reads every request (blank lines are skipped).
pub fn read_trace(reader: impl BufRead) -> Result<Vec<TraceRequest>, TraceError> {
    let mut requests = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let request = serde_json::from_str(&line).map_err(|source| TraceError::Line { line: i + 1, source })?;
        requests.push(request);
    }
    if requests.is_empty() {
        return Err(TraceError::Empty);
    }
    Ok(requests)
}

/// Writes requests as JSON Lines.
pub fn write_trace(mut writer: impl Write, requests: &[TraceRequest]) -> std::io::Result<()> {
    for request in requests {
        serde_json::to_writer(&mut writer, request)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_errors_name_the_line() {
        let requests = vec![
            TraceRequest { timestamp: 0, input_length: 700, output_length: 10, hash_ids: vec![1, 2] },
            TraceRequest { timestamp: 5, input_length: 100, output_length: 0, hash_ids: vec![1] },
        ];
        let mut out = Vec::new();
        write_trace(&mut out, &requests).unwrap();
        assert_eq!(read_trace(&out[..]).unwrap(), requests);
        let minimal = br#"{"input_length": 3, "hash_ids": [9]}"#;
        assert_eq!(read_trace(&minimal[..]).unwrap()[0].hash_ids, vec![9]);
        let bad = b"{\"input_length\": 1, \"hash_ids\": [1]}\n\n{\"hash_ids\": \"x\"}\n";
        let err = read_trace(&bad[..]).unwrap_err();
        assert!(err.to_string().starts_with("line 3:"), "{err}");
        assert!(matches!(read_trace(&b"\n"[..]), Err(TraceError::Empty)));
    }
}
