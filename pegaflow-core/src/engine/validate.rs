//! Checks of a request's fields against the rank it names, shared by save and load:
//! hashes, layers, block ids. Each failure is an `InvalidArgument` naming the field.

use super::registry::RankBinding;
use crate::error::{EngineError, Result};

/// The layers a request names (empty: all), checked and deduplicated.
pub(super) fn select_layers(rank: &RankBinding, layers: &[u32]) -> Result<Vec<u32>> {
    let num_layers = rank.layers.len() as u32;
    if layers.is_empty() {
        return Ok((0..num_layers).collect());
    }
    let mut seen = vec![false; num_layers as usize];
    for &layer in layers {
        let slot = seen
            .get_mut(layer as usize)
            .ok_or_else(|| EngineError::invalid(format!("layer {layer} is outside 0..{num_layers}")))?;
        if std::mem::replace(slot, true) {
            return Err(EngineError::invalid(format!("layer {layer} is listed twice")));
        }
    }
    Ok(layers.to_vec())
}

/// `(block id, position in the request)` sorted by block id, the order copies are
/// emitted in. Destination blocks of one load must differ: two copies into the same
/// bytes race.
pub(super) fn destination_order(block_ids: &[u64]) -> Result<Vec<(u64, usize)>> {
    let mut order: Vec<(u64, usize)> = block_ids.iter().copied().zip(0..).collect();
    order.sort_unstable();
    match order.windows(2).find(|w| w[0].0 == w[1].0) {
        Some(w) => Err(EngineError::invalid(format!("destination block id {} is listed twice", w[0].0))),
        None => Ok(order),
    }
}

pub(super) fn check_block_ids(rank: &RankBinding, layers: &[u32], block_ids: &[u64]) -> Result<()> {
    let limit = layers.iter().map(|&l| rank.layers[l as usize].layout.num_blocks()).min().unwrap_or(0);
    if let Some((i, id)) = block_ids.iter().enumerate().find(|(_, id)| **id >= limit) {
        return Err(EngineError::invalid(format!("block id {id} (position {i}) is out of range 0..{limit}")));
    }
    Ok(())
}
