use super::*;
use crate::sampling_params::RequestParams;

/// `cargo test --release --lib timing -- --ignored --nocapture`: the core's share of a
/// 1,024-sequence decode step, without the Python boundary.
#[test]
#[ignore]
fn decode_step_1024() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            num_blocks: 200_000,
            block_size: 16,
            max_model_len: 8192,
            max_num_seqs: 1024,
            max_num_batched_tokens: 8192,
            max_num_sample_rows: 1024 + 128,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            eos_token_ids: vec![0],
            seed: 0,
        },
        std::env::var("FASTSERVE_TIMING_TOKENIZER").ok().map(|d| Arc::new(CoreTokenizer::from_dir(&d).unwrap())),
    )
    .unwrap();
    let stop: Vec<String> =
        if s.tokenizer.is_some() { vec!["\u{2603}STOP\u{2603}".into(), "<|bench-end|>".into()] } else { vec![] };
    let mut x = 1u64;
    for i in 0..1024 {
        let p: Vec<u32> = (0..128)
            .map(|_| {
                x = splitmix64(x);
                100 + (x % 30000) as u32
            })
            .collect();
        s.add_request(
            &format!("r{i}"),
            p,
            RequestParams { max_tokens: 4000, ignore_eos: true, stop: stop.clone(), ..Default::default() },
        )
        .unwrap();
    }
    // Fresh random ids each step over most of the vocabulary, as a model samples them: the
    // same ids every step would keep their detokenizer table entries in cache.
    let vocab = s.tokenizer.as_ref().map_or(30_000, |t| t.vocab_size.min(120_000)) as u64;
    let mut draw = |n: usize| -> Vec<i64> {
        (0..n)
            .map(|_| {
                x = splitmix64(x);
                100 + (x % (vocab - 100)) as i64
            })
            .collect()
    };
    for _ in 0..40 {
        let b = s.schedule().unwrap().unwrap();
        s.update(&draw(b.num_samples), 0.0).unwrap();
    }
    let (mut ts, mut tu) = (vec![], vec![]);
    let steps: usize = std::env::var("FASTSERVE_TIMING_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    for _ in 0..steps {
        let ids = draw(1024);
        let t0 = std::time::Instant::now();
        let b = s.schedule().unwrap().unwrap();
        let t1 = std::time::Instant::now();
        let o = s.update(&ids[..b.num_samples], 0.0).unwrap();
        let t2 = std::time::Instant::now();
        drop((b, o));
        ts.push((t1 - t0).as_nanos());
        tu.push((t2 - t1).as_nanos());
    }
    ts.sort();
    tu.sort();
    eprintln!("schedule median {} us, update median {} us", ts[steps / 2] / 1000, tu[steps / 2] / 1000);
}
