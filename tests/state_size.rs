//! Measures the memory an open (key, window) costs in the window store, with an allocator
//! that counts live bytes: `count` must stay within 64 bytes plus the key's bytes.
#![allow(unsafe_code)] // a counting GlobalAlloc needs `unsafe impl`; nothing else here does

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use weir_engine::window::{WindowRange, WindowStore};
use weir_engine::Position;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Live bytes per entry for `n` keys of `key_len` bytes in one window (count only).
fn bytes_per_entry(n: usize, key_len: usize) -> f64 {
    let keys: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("{i:0key_len$}").into_bytes())
        .collect();
    let w = WindowRange {
        start: 0,
        end: 10_000,
    };
    let before = LIVE.load(Ordering::Relaxed);
    let mut store = WindowStore::new();
    for (i, k) in keys.iter().enumerate() {
        store.count(
            w,
            k,
            Position {
                partition: 0,
                offset: i as u64,
            },
        );
    }
    let used = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(store.entries(), n);
    drop(store);
    used as f64 / n as f64
}

#[test]
fn an_open_count_costs_at_most_64_bytes_plus_its_key() {
    let key_len = 12;
    let mut worst: f64 = 0.0;
    for n in [1_000, 5_000, 20_000, 50_000, 100_000, 300_000] {
        let per = bytes_per_entry(n, key_len);
        eprintln!("{n:>7} keys: {per:.1} bytes per (key, window), of which {key_len} key bytes");
        worst = worst.max(per - key_len as f64);
    }
    eprintln!("worst overhead beyond the key: {worst:.1} bytes");
    assert!(worst <= 64.0, "{worst:.1} bytes per entry beyond the key");
}
