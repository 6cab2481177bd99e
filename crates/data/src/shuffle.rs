//! numpy's `np.random.default_rng(seed).permutation(n)`, bit for bit.
//!
//! Hugging Face `datasets` shuffles with `Dataset.shuffle(seed=s)`, which selects the rows
//! `np.random.default_rng(s).permutation(len(ds))`; `train_test_split(seed=s)` cuts the same
//! permutation. Reproducing it exactly means the same rows, in the same order, as the handbook.
//! The chain is: `SeedSequence(seed)` → four 64-bit words → `PCG64` (128-bit LCG, XSL-RR output)
//! → `Generator.shuffle` of `arange(n)` (Fisher–Yates from the end, with numpy's bounded-integer
//! rejection sampler `random_interval`, which draws 32-bit halves of the 64-bit outputs while the
//! bound fits in 32 bits). Golden permutations from numpy are in `tests/fixtures/datasets/`.

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 4;
/// PCG's default 128-bit multiplier (numpy's `PCG_DEFAULT_MULTIPLIER_128`).
const PCG_MULTIPLIER: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341u128;

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut value = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    value = value.wrapping_mul(*hash_const);
    value ^ (value >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

/// `np.random.SeedSequence(seed).generate_state(n, np.uint64)` for a non-negative integer seed
/// (no spawn key).
pub fn seed_sequence_u64(seed: u64, n: usize) -> Vec<u64> {
    // _coerce_to_uint32_array: little-endian 32-bit words, [0] for zero.
    let mut entropy = Vec::new();
    let mut rest = seed;
    loop {
        entropy.push(rest as u32);
        rest >>= 32;
        if rest == 0 {
            break;
        }
    }
    let mut pool = [0u32; POOL_SIZE];
    let mut hash_const = INIT_A;
    for (i, slot) in pool.iter_mut().enumerate() {
        *slot = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                let h = hashmix(pool[src], &mut hash_const);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &word in entropy.iter().skip(POOL_SIZE) {
        for slot in pool.iter_mut() {
            let h = hashmix(word, &mut hash_const);
            *slot = mix(*slot, h);
        }
    }
    let mut hash_const = INIT_B;
    let words: Vec<u32> = (0..2 * n)
        .map(|i| {
            let mut value = pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> XSHIFT)
        })
        .collect();
    words.chunks(2).map(|w| u64::from(w[0]) | (u64::from(w[1]) << 32)).collect()
}

/// numpy's `Generator(PCG64(seed))`: the 64-bit outputs plus the buffered 32-bit half that
/// `next_uint32` hands out on every second call.
#[derive(Debug, Clone)]
pub struct NumpyRng {
    state: u128,
    inc: u128,
    pending_u32: Option<u32>,
}

impl NumpyRng {
    /// `np.random.default_rng(seed)`.
    pub fn new(seed: u64) -> Self {
        let words = seed_sequence_u64(seed, 4);
        let initstate = (u128::from(words[0]) << 64) | u128::from(words[1]);
        let initseq = (u128::from(words[2]) << 64) | u128::from(words[3]);
        let mut rng = Self { state: 0, inc: (initseq << 1) | 1, pending_u32: None };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULTIPLIER).wrapping_add(self.inc);
    }

    /// The next raw 64-bit output (`bit_generator.random_raw()`).
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let folded = ((self.state >> 64) as u64) ^ (self.state as u64);
        folded.rotate_right((self.state >> 122) as u32)
    }

    /// numpy's `next_uint32`: the low half of a fresh 64-bit output, then its high half.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(high) = self.pending_u32.take() {
            return high;
        }
        let next = self.next_u64();
        self.pending_u32 = Some((next >> 32) as u32);
        next as u32
    }

    /// numpy's `random_interval(max)`: uniform in `0..=max` by masked rejection.
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u64::from(u32::MAX) {
            loop {
                let value = u64::from(self.next_u32()) & mask;
                if value <= max {
                    return value;
                }
            }
        }
        loop {
            let value = self.next_u64() & mask;
            if value <= max {
                return value;
            }
        }
    }

    /// `Generator.shuffle` of a 1-d array: Fisher–Yates from the last element down.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.interval(i as u64) as usize;
            items.swap(i, j);
        }
    }
}

/// `np.random.default_rng(seed).permutation(n)`: the row order of `Dataset.shuffle(seed=seed)`.
pub fn permutation(seed: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    NumpyRng::new(seed).shuffle(&mut order);
    order
}

/// `items` in the order `Dataset.shuffle(seed=seed)` gives a dataset of these rows: for rows
/// that are not a [`crate::Dataset`]'s, such as TRL's tokenized or packed examples.
pub fn shuffled<T>(items: Vec<T>, seed: u64) -> Vec<T> {
    let order = permutation(seed, items.len());
    in_order(items, &order)
}

/// `items` rearranged so that the k-th is `items[order[k]]`, moved, not cloned; `order` is a
/// permutation of `0..items.len()`.
pub(crate) fn in_order<T>(items: Vec<T>, order: &[usize]) -> Vec<T> {
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    order.iter().filter_map(|&i| slots[i].take()).collect()
}
