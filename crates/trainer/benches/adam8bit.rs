//! `optim: adamw_bnb_8bit`'s host update of one SmolLM2-135M MLP weight (1536 × 576 elements) on
//! the CPU: the 8-bit block-wise update (`adam8bit::update_blockwise`: dequantise, update, block
//! maxima, two binary searches an element) against the same update on f32 moments
//! (`adam8bit::update_32bit`, what parameters under 4096 elements and the embedding take, and
//! the cost of a host AdamW pass without quantisation), and the 8-bit update's tensor form
//! (`adam8bit_tensors::update_blockwise`, what the GPU backends run) on the ndarray backend: what
//! the host pass saves where the device is the host. Criterion's "elements" are parameters.
//!
//! `cargo bench -p alignment-trainer --bench adam8bit -- --warm-up-time 1 --measurement-time 5`

use alignment_trainer::adam8bit::{update_32bit, update_blockwise, BlockwiseMoments, Scalars};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use std::hint::black_box;

const ELEMENTS: usize = 1536 * 576;

fn update(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let p: Vec<f32> = (0..ELEMENTS).map(|_| rng.random_range(-0.05..0.05)).collect();
    let g: Vec<f32> = (0..ELEMENTS).map(|_| rng.random_range(-1e-3..1e-3)).collect();
    let s = Scalars::new(0.9, 0.999, 1e-8, 1e-4, 0.01, 10);
    let mut group = c.benchmark_group("adam_update_135m_mlp");
    group.throughput(Throughput::Elements(ELEMENTS as u64));
    let (mut p8, mut moments) = (p.clone(), BlockwiseMoments::zeros(ELEMENTS));
    update_blockwise(&s, &mut p8, &g, &mut moments); // moments with values, as after the first step
    group.bench_function("8bit_blockwise", |b| b.iter(|| update_blockwise(&s, black_box(&mut p8), &g, &mut moments)));
    let (mut p32, mut m, mut v) = (p.clone(), vec![0f32; ELEMENTS], vec![0f32; ELEMENTS]);
    group.bench_function("32bit", |b| b.iter(|| update_32bit(&s, black_box(&mut p32), &g, &mut m, &mut v)));
    {
        use alignment_trainer::adam8bit_tensors::{self, CodeTables, TensorMoments};
        use burn::tensor::{Tensor, TensorData};
        type Cpu = alignment_core::backend::Cpu;
        let device = Default::default();
        let maps = CodeTables::<Cpu>::new(&device);
        let tensor = |v: &[f32]| Tensor::<Cpu, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        let (pt, gt) = (tensor(&p8), tensor(&g));
        let state = TensorMoments::<Cpu>::upload(&moments, &device);
        group.bench_function("8bit_tensor_form_ndarray", |b| {
            b.iter(|| {
                let (p, state) = adam8bit_tensors::update_blockwise(&s, &maps, pt.clone(), gt.clone(), state.clone());
                black_box((p.into_data(), state.absmax1.into_data()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, update);
criterion_main!(benches);
