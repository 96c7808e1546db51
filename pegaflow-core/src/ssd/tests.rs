//! The store on real files: round trips, restarts, corruption, torn records, wrap-around,
//! locking and bad paths.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::file::{ALIGN, DATA_FILE};
use super::{BlockFile, BlockId, BlockRecord, SsdError};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("pegaflow-ssd-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id(n: u8) -> BlockId {
    BlockId { namespace: "llama".into(), hash: [n; 32], part: 0, layout: 9 }
}

fn payload(n: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(n)).collect()
}

/// Opens the cache with layout 9 (the one `id` uses) recorded.
fn open(path: &std::path::Path, capacity: u64) -> BlockFile {
    let mut file = BlockFile::open(path, capacity).unwrap();
    file.add_layout(9, &[4096, 4096]).unwrap();
    file
}

fn read(file: &BlockFile, rec: &BlockRecord) -> Result<Vec<u8>, SsdError> {
    let mut out = vec![0u8; rec.len as usize];
    file.read(rec, &mut out)?;
    Ok(out)
}

fn ids(records: &[BlockRecord]) -> Vec<BlockId> {
    records.iter().map(|r| r.id.clone()).collect()
}

#[test]
fn blocks_round_trip_and_survive_a_restart() {
    let dir = TempDir::new();
    {
        let mut file = open(&dir.0, 1 << 20);
        let records: Vec<BlockRecord> =
            (0..3u8).map(|n| file.write(id(n), &payload(n, 5000 + usize::from(n))).unwrap()).collect();
        assert!(records.iter().all(|r| r.offset % ALIGN == 0 && file.is_live(r.offset)));
        assert_eq!(read(&file, &records[1]).unwrap(), payload(1, 5001));
    } // dropped without any shutdown step: like a killed process
    let mut file = open(&dir.0, 1 << 20);
    let replayed = file.take_replayed();
    assert_eq!(ids(&replayed), vec![id(0), id(1), id(2)]);
    for (n, rec) in replayed.iter().enumerate() {
        assert_eq!(read(&file, rec).unwrap(), payload(n as u8, 5000 + n));
    }
    assert!(file.take_replayed().is_empty(), "handed out once");
    assert!(dir.0.join(DATA_FILE).exists());
}

#[test]
fn a_corrupted_block_is_an_error_and_can_be_dropped_for_good() {
    let dir = TempDir::new();
    let mut file = open(&dir.0, 1 << 20);
    let rec = file.write(id(1), &payload(1, 9000)).unwrap();
    let other = file.write(id(2), &payload(2, 9000)).unwrap();
    let data = OpenOptions::new().write(true).open(dir.0.join(DATA_FILE)).unwrap();
    data.write_all_at(&[0xAA], rec.offset + 100).unwrap();
    assert!(matches!(read(&file, &rec), Err(SsdError::Corrupt { offset, .. }) if offset == rec.offset));
    assert_eq!(read(&file, &other).unwrap(), payload(2, 9000));
    file.drop_block(rec.offset).unwrap();
    drop(file);
    let mut file = open(&dir.0, 1 << 20);
    assert_eq!(ids(&file.take_replayed()), vec![id(2)], "the drop is durable");
}

#[test]
fn a_torn_index_record_is_never_served_and_is_cut_off() {
    let dir = TempDir::new();
    let index = dir.0.join(format!("{DATA_FILE}.index"));
    {
        let mut file = open(&dir.0, 1 << 20);
        file.write(id(1), &payload(1, 4096)).unwrap();
        file.write(id(2), &payload(2, 4096)).unwrap();
    }
    // The process died while appending block 2's record: only part of it reached the file.
    let len = std::fs::metadata(&index).unwrap().len();
    OpenOptions::new().write(true).open(&index).unwrap().set_len(len - 7).unwrap();
    {
        let mut file = open(&dir.0, 1 << 20);
        assert_eq!(ids(&file.take_replayed()), vec![id(1)]);
        file.write(id(3), &payload(3, 4096)).unwrap();
    }
    let mut file = open(&dir.0, 1 << 20);
    let replayed = file.take_replayed();
    assert_eq!(ids(&replayed), vec![id(1), id(3)], "records after the cut replay");
    assert_eq!(read(&file, &replayed[1]).unwrap(), payload(3, 4096));
}

#[test]
fn a_full_cache_reuses_its_oldest_blocks_also_after_a_restart() {
    let dir = TempDir::new();
    let capacity = 4 * ALIGN;
    let mut file = open(&dir.0, capacity);
    let first: Vec<BlockRecord> = (0..4u8).map(|n| file.write(id(n), &payload(n, 4000)).unwrap()).collect();
    let big = file.write(id(4), &payload(4, 6000)).unwrap();
    assert_eq!(big.offset, capacity, "the second lap starts at the file's beginning");
    let live: Vec<bool> = first.iter().map(|r| file.is_live(r.offset)).collect();
    assert_eq!(live, vec![false, false, true, true], "the two oldest were overwritten");
    assert!(matches!(read(&file, &first[0]), Err(SsdError::Overwritten(_))));
    drop(file);
    let mut file = open(&dir.0, capacity);
    assert_eq!(ids(&file.take_replayed()), vec![id(2), id(3), id(4)]);
    // The head continues after block 4: block 2 goes next.
    file.write(id(5), &payload(5, 100)).unwrap();
    assert!(!file.is_live(first[2].offset) && file.is_live(first[3].offset));
    assert_eq!(read(&file, &big).unwrap(), payload(4, 6000));
    assert!(matches!(file.write(id(6), &payload(6, 5 * 4096)), Err(SsdError::Config(_))));
}

#[test]
fn the_index_log_is_compacted_as_blocks_are_replaced() {
    let dir = TempDir::new();
    let index = dir.0.join(format!("{DATA_FILE}.index"));
    let mut file = open(&dir.0, 8 * ALIGN);
    for n in 0..20_000u32 {
        file.write(BlockId { hash: [(n % 251) as u8; 32], ..id(0) }, &n.to_le_bytes()).unwrap();
    }
    assert!(std::fs::metadata(&index).unwrap().len() < 1 << 20, "not every replaced record is kept");
    drop(file);
    let mut file = open(&dir.0, 8 * ALIGN);
    let replayed = file.take_replayed();
    assert_eq!(replayed.len(), 8);
    let mut out = vec![0u8; 4];
    file.read(replayed.last().unwrap(), &mut out).unwrap();
    assert_eq!(out, 19_999u32.to_le_bytes());
    assert_eq!(file.layout(9), Some(&[4096u64, 4096][..]), "the layout survives compaction");
}

#[test]
fn a_second_opener_of_the_same_path_is_refused() {
    let dir = TempDir::new();
    let _first = BlockFile::open(&dir.0, 1 << 20).unwrap();
    let err = BlockFile::open(&dir.0, 1 << 20).unwrap_err();
    assert!(matches!(err, SsdError::Locked(_)), "{err}");
    assert!(err.to_string().contains("in use by another process"), "{err}");
}

#[test]
fn bad_paths_and_sizes_fail_with_clear_errors() {
    let dir = TempDir::new();
    let missing = dir.0.join("no/such/dir/cache");
    let err = BlockFile::open(&missing, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
    let err = BlockFile::open(&dir.0, 100).unwrap_err();
    assert!(matches!(err, SsdError::Config(_)), "{err}");
    let err = BlockFile::open(&dir.0.join("huge"), 1 << 62).unwrap_err();
    assert!(matches!(err, SsdError::NoSpace { .. } | SsdError::Io { .. }), "{err}");
    assert!(err.to_string().contains("huge"), "{err}");
    // A file path (not a directory): the index sits beside it.
    let file = BlockFile::open(&dir.0.join("cache.bin"), 1 << 20).unwrap();
    assert_eq!(file.path(), dir.0.join("cache.bin"));
    assert!(dir.0.join("cache.bin.index").exists());
}

#[test]
fn layouts_are_recorded_once_and_required() {
    let dir = TempDir::new();
    let mut file = BlockFile::open(&dir.0, 1 << 20).unwrap();
    let err = file.write(id(1), &payload(1, 100)).unwrap_err();
    assert!(err.to_string().contains("add_layout first"), "{err}");
    file.add_layout(9, &[4096, 4096]).unwrap();
    file.add_layout(9, &[4096, 4096]).unwrap();
    assert!(file.add_layout(9, &[8192]).is_err(), "one fingerprint, one layout");
    assert!(file.add_layout(10, &[]).is_err());
    let rec = file.write(id(1), &payload(1, 100)).unwrap();
    drop(file);
    let file = BlockFile::open(&dir.0, 1 << 20).unwrap();
    assert_eq!(file.layout(9), Some(&[4096u64, 4096][..]));
    assert_eq!(read(&file, &rec).unwrap(), payload(1, 100));
}

#[test]
fn direct_io_is_used_only_where_the_device_alignment_fits_the_extents() {
    use super::file::fits_extents;
    assert!(fits_extents(None), "unknown: try direct I/O (a refusal falls back at open)");
    assert!(fits_extents(Some((512, 512))) && fits_extents(Some((4096, 4096))));
    assert!(!fits_extents(Some((8192, 512))), "a device of 8 KiB sectors");
    assert!(!fits_extents(Some((512, 8192))));
    assert!(!fits_extents(Some((0, 0))), "no direct I/O for this file");
    // Whatever this machine's file system, opening picks a mode and the cache works.
    let dir = TempDir::new();
    let mut file = open(&dir.0, 1 << 20);
    let rec = file.write(id(1), &payload(1, 5000)).unwrap();
    assert_eq!(read(&file, &rec).unwrap(), payload(1, 5000));
}
