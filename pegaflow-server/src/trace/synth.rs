//! A seeded synthetic trace of mixed production traffic: multi-turn conversations whose
//! popularity follows a Zipf law, each behind one of a few shared system prompts (also
//! Zipf), mixed with one-off long documents (scans) behind the same prompts. Same seed,
//! same trace.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Zipf};

use super::format::{TOKENS_PER_BLOCK, TraceRequest};

/// Shape of a synthetic trace.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthConfig {
    /// Requests to generate.
    #[arg(long, default_value_t = 50_000)]
    pub requests: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Conversations that may be continued.
    #[arg(long, default_value_t = 5_000)]
    pub conversations: usize,
    /// Zipf exponent of conversation (and system prompt) popularity.
    #[arg(long, default_value_t = 0.6)]
    pub zipf: f64,
    /// Shared system prompts.
    #[arg(long, default_value_t = 40)]
    pub system_prompts: usize,
    /// Blocks of each system prompt.
    #[arg(long, default_value_t = 4)]
    pub system_blocks: usize,
    /// Share of requests that are one-off long documents.
    #[arg(long, default_value_t = 0.2)]
    pub scan_fraction: f64,
    /// Largest one-off document, blocks (the smallest is a quarter of it).
    #[arg(long, default_value_t = 32)]
    pub scan_blocks: usize,
    /// Largest number of new blocks one conversation turn adds (the smallest is 1).
    #[arg(long, default_value_t = 4)]
    pub turn_blocks: usize,
    /// A conversation longer than this many blocks starts over.
    #[arg(long, default_value_t = 48)]
    pub max_conversation_blocks: usize,
    /// Mean time between requests, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub mean_gap_ms: f64,
}

impl Default for SynthConfig {
    /// The command line's defaults (one place says them).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: SynthConfig,
        }
        <Defaults as clap::Parser>::parse_from(["synth"]).config
    }
}

/// Why a synthetic trace could not be made.
#[derive(Debug, thiserror::Error)]
#[error("invalid synthetic trace shape: {0}")]
pub struct SynthError(String);

/// Generates the trace `config` describes.
pub fn synthesize(config: &SynthConfig) -> Result<Vec<TraceRequest>, SynthError> {
    let bad = |what: &str| SynthError(what.to_owned());
    if config.conversations == 0 || config.system_prompts == 0 || config.system_blocks == 0 {
        return Err(bad("conversations, system prompts and their blocks must be positive"));
    }
    if config.scan_blocks < 4 || config.turn_blocks == 0 || config.max_conversation_blocks == 0 {
        return Err(bad("scan blocks must be at least 4; turn and conversation blocks positive"));
    }
    if !(0.0..=1.0).contains(&config.scan_fraction) {
        return Err(bad("the scan fraction lies in 0..=1"));
    }
    let zipf = |n: usize| Zipf::new(n as f64, config.zipf).map_err(|e| SynthError(e.to_string()));
    let conversation_zipf = zipf(config.conversations)?;
    let prompt_zipf = zipf(config.system_prompts)?;
    let gaps = Exp::new(1.0 / config.mean_gap_ms.max(1e-3)).map_err(|e| SynthError(e.to_string()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);

    // Ids: system prompts first, then every fresh block in order of creation.
    let prompt_ids = |p: usize| (p * config.system_blocks) as u64..((p + 1) * config.system_blocks) as u64;
    let mut next_id = (config.system_prompts * config.system_blocks) as u64;
    let mut fresh = |n: usize| {
        let ids: Vec<u64> = (next_id..next_id + n as u64).collect();
        next_id += n as u64;
        ids
    };
    // Per conversation: its system prompt and blocks so far (empty: not started).
    let mut conversations: Vec<(usize, Vec<u64>)> = vec![(0, Vec::new()); config.conversations];
    let mut requests = Vec::with_capacity(config.requests);
    let mut now = 0.0f64;
    for _ in 0..config.requests {
        now += gaps.sample(&mut rng);
        let mut hash_ids: Vec<u64>;
        if rng.random_bool(config.scan_fraction) {
            let prompt = prompt_zipf.sample(&mut rng) as usize - 1;
            let len = rng.random_range(config.scan_blocks / 4..=config.scan_blocks);
            hash_ids = prompt_ids(prompt).collect();
            hash_ids.extend(fresh(len));
        } else {
            let c = conversation_zipf.sample(&mut rng) as usize - 1;
            let (prompt, blocks) = &mut conversations[c];
            if blocks.is_empty() || blocks.len() > config.max_conversation_blocks {
                *prompt = prompt_zipf.sample(&mut rng) as usize - 1;
                blocks.clear();
            }
            blocks.extend(fresh(rng.random_range(1..=config.turn_blocks)));
            hash_ids = prompt_ids(*prompt).collect();
            hash_ids.extend(blocks.iter().copied());
        }
        let full = hash_ids.len() as u64 * TOKENS_PER_BLOCK;
        requests.push(TraceRequest {
            timestamp: now as u64,
            // The prompt's last block is partly filled: its tail is not a whole block.
            input_length: full + rng.random_range(0..TOKENS_PER_BLOCK),
            output_length: rng.random_range(64..=1024),
            hash_ids,
        });
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
        let config = SynthConfig { requests: 500, ..SynthConfig::default() };
        let a = synthesize(&config).unwrap();
        assert_eq!(a, synthesize(&config).unwrap());
        assert_ne!(a, synthesize(&SynthConfig { seed: 2, ..config }).unwrap());
    }

    #[test]
    fn conversations_grow_their_prefix_and_scans_are_one_off() {
        let config = SynthConfig { requests: 4_000, ..SynthConfig::default() };
        let trace = synthesize(&config).unwrap();
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for r in &trace {
            for id in &r.hash_ids {
                *seen.entry(*id).or_default() += 1;
            }
            assert!(r.input_length >= r.hash_ids.len() as u64 * TOKENS_PER_BLOCK);
        }
        let system = (config.system_prompts * config.system_blocks) as u64;
        let reused = seen.iter().filter(|(id, n)| **id >= system && **n > 1).count();
        let once = seen.iter().filter(|(id, n)| **id >= system && **n == 1).count();
        assert!(reused > 1_000, "continued conversations reuse their blocks: {reused}");
        assert!(once > reused, "scans and last turns leave many one-off blocks: {once}");
        // Popularity is skewed: the hottest prompt block is asked for far more than most.
        let hottest = seen.values().max().copied().unwrap_or(0);
        assert!(hottest > trace.len() / 10, "{hottest}");
        assert!(synthesize(&SynthConfig { scan_fraction: 2.0, ..config }).is_err());
    }
}
