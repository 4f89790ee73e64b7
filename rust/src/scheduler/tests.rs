use super::*;
use crate::sampling_params::RequestParams;
use crate::sequence::{FinishReason, StopReason};
use proptest::prelude::*;

fn cfg(num_blocks: usize, max_num_seqs: usize, max_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        num_blocks,
        block_size: 4,
        max_model_len: 96,
        max_num_seqs,
        max_num_batched_tokens: max_tokens,
        max_num_sample_rows: max_num_seqs + 3,
        enable_prefix_caching: true,
        enable_chunked_prefill: true,
        eos_token_ids: vec![],
        seed: 7,
    }
}

fn params(n: u32, max_tokens: u32) -> RequestParams {
    RequestParams { n, max_tokens, ignore_eos: true, ..Default::default() }
}

/// Checks a batch's layout against the scheduler's own state before update().
fn check_batch(s: &Scheduler, b: &BatchData) {
    assert_eq!(b.query_start_loc.len(), b.num_seqs + 1);
    assert_eq!(*b.query_start_loc.last().unwrap() as usize, b.num_tokens);
    assert!(b.num_tokens <= s.cfg.max_num_batched_tokens);
    assert!(b.num_seqs <= s.cfg.max_num_seqs);
    assert!(b.num_samples <= s.cfg.max_num_sample_rows);
    for row in 0..b.num_seqs {
        let (q0, q1) = (b.query_start_loc[row] as usize, b.query_start_loc[row + 1] as usize);
        assert!(q1 > q0);
        if row < b.num_decodes {
            assert_eq!(q1 - q0, 1);
        }
        assert_eq!(b.positions[q1 - 1] + 1, b.seq_lens[row] as i64);
        for t in q0..q1 {
            let pos = b.positions[t] as usize;
            let blk = b.block_tables[row * b.max_blocks + pos / 4] as i64;
            assert_eq!(b.slot_mapping[t], blk * 4 + (pos % 4) as i64);
        }
    }
    assert_eq!(b.logits_indices.len(), b.num_samples);
    assert_eq!(b.sample_seq_slots.len(), b.num_samples);
    assert_eq!(b.sample_steps.len(), b.num_samples);
    assert_eq!(b.new_seed_count(), b.new_seq_slots.len());
}

impl BatchData {
    fn new_seed_count(&self) -> usize {
        self.new_seeds.len()
    }
}

/// The worker's view of the sampler-state protocol: slot -> request id, updated from
/// each batch that runs. Every sample row must name a slot the worker knows, holding its
/// own request's state.
fn apply_to_worker(s: &Scheduler, b: &BatchData, known: &mut std::collections::HashMap<i32, String>) {
    for f in &b.freed_seq_slots {
        known.remove(f);
    }
    for &slot in &b.new_seq_slots {
        let id = seq_ref(&s.seqs, slot as u32).request_id.to_string();
        known.insert(slot, id);
    }
    for j in 0..b.num_samples {
        let row = b.sample_rows[j] as usize;
        let want = req_ref(&s.requests, b.row_req_slots[row]).request_id.to_string();
        let slot = b.sample_seq_slots[j];
        assert_eq!(
            known.get(&slot),
            Some(&want),
            "sample row {j} names slot {slot} the worker does not hold for {want}"
        );
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// prompt, n, max_tokens, final_only
    Add(Vec<u32>, u32, u32, bool),
    Step,
    Abort(usize),
    /// schedule() then discard_pending(): the worker refused the batch.
    Discard,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (proptest::collection::vec(0u32..3, 1..40), 1u32..4, 1u32..12, any::<bool>())
            .prop_map(|(p, n, m, f)| Op::Add(p, n, m, f)),
        5 => Just(Op::Step),
        1 => any::<usize>().prop_map(Op::Abort),
        1 => Just(Op::Discard),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Random adds, steps and aborts against a small pool: the bookkeeping stays exact,
    /// every request that was not aborted ends with exactly max_tokens outputs per child,
    /// every block comes back, a final-only request ("f" ids) never gets a row and a
    /// streamed one gets a row per token.
    #[test]
    fn scheduler_invariants(ops in proptest::collection::vec(op(), 1..60),
                            blocks in 14usize..40, seqs in 1usize..6, budget in 1usize..40,
                            samples in 3usize..9) {
        // Sample-row limits from 3 (the largest n below) up: prompts finishing with n > 1
        // must wait for room, never overflow it.
        let mut s = Scheduler::new(SchedulerConfig { max_num_sample_rows: samples, ..cfg(blocks, seqs, budget) }, None).unwrap();
        let mut expect: std::collections::HashMap<String, (u32, u32)> = Default::default();
        let mut got: std::collections::HashMap<(String, u32), (u32, Option<FinishReason>)> = Default::default();
        let mut rows: std::collections::HashMap<(String, u32), u32> = Default::default();
        let mut next = 0;
        let mut rng = 1u64;
        let mut known: std::collections::HashMap<i32, String> = Default::default();
        let mut step = |s: &mut Scheduler, got: &mut std::collections::HashMap<(String, u32), (u32, Option<FinishReason>)>, rng: &mut u64| {
            let record = |got: &mut std::collections::HashMap<(String, u32), (u32, Option<FinishReason>)>, r: &StepResult| {
                for f in &r.finished {
                    let e = got.entry((f.request_id.to_string(), f.sample_index)).or_default();
                    assert!(e.1.is_none(), "finished twice");
                    *e = (f.token_ids.len() as u32, Some(f.finish_reason));
                }
            };
            let Some(b) = s.schedule().unwrap() else {
                let r = s.update(&[], 0.0).unwrap();
                assert_eq!(r.num_rows(), 0);
                record(got, &r);
                return false;
            };
            check_batch(s, &b);
            apply_to_worker(s, &b, &mut known);
            // Slots name requests only until update() releases them: read the ids now.
            let slot_ids: std::collections::HashMap<u32, String> = b.row_req_slots.iter()
                .map(|&sl| (sl, req_ref(&s.requests, sl).request_id.to_string())).collect();
            let ids: Vec<i64> = (0..b.num_samples).map(|_| { *rng = splitmix64(*rng); (*rng % 50) as i64 }).collect();
            let r = s.update(&ids, 0.0).unwrap();
            assert!(r.num_new_tokens >= r.num_rows());
            for j in 0..r.num_rows() {
                assert_eq!(r.row_token[j], ids[r.row_sample_row[j] as usize]);
                let id = &slot_ids[&r.row_req[j]];
                assert!(id.starts_with('r'), "final-only request {id} got a row");
                *rows.entry((id.clone(), r.row_sample_index[j] as u32)).or_default() += 1;
            }
            for f in r.finished.iter().filter(|f| f.request_id.starts_with('r')) {
                assert_eq!(rows.get(&(f.request_id.to_string(), f.sample_index)).copied().unwrap_or(0),
                           f.token_ids.len() as u32, "a streamed sequence's rows are its tokens");
            }
            record(got, &r);
            s.check_invariants().unwrap();
            true
        };
        for op in ops {
            match op {
                Op::Add(p, n, m, final_only) => {
                    let id = format!("{}{next}", if final_only { 'f' } else { 'r' });
                    next += 1;
                    if s.add_request(&id, p, RequestParams { final_only, ..params(n, m) }).is_ok() {
                        expect.insert(id, (n, m));
                    }
                }
                Op::Step => { step(&mut s, &mut got, &mut rng); }
                Op::Discard => {
                    if let Some(b) = s.schedule().unwrap() {
                        check_batch(&s, &b);
                        prop_assert!(s.discard_pending());
                    }
                    prop_assert!(!s.discard_pending());
                }
                Op::Abort(i) => {
                    if next > 0 {
                        for kind in ['r', 'f'] {
                            let id = format!("{kind}{}", i % next);
                            if s.abort_request(&id) {
                                expect.get_mut(&id).unwrap().1 = 0;
                            }
                        }
                    }
                }
            }
            s.check_invariants().unwrap();
        }
        let mut guard = 0;
        while s.has_unfinished() || guard == 0 {
            step(&mut s, &mut got, &mut rng);
            guard += 1;
            prop_assert!(guard < 5000, "no progress");
        }
        for (id, (n, m)) in expect {
            for i in 0..n {
                let (count, fin) = got.get(&(id.clone(), i)).cloned().unwrap_or_default();
                if m == 0 {
                    prop_assert!(fin.is_some());
                } else {
                    prop_assert_eq!(count, m, "{} child {}", id, i);
                    prop_assert_eq!(fin, Some(FinishReason::Length));
                }
            }
        }
        prop_assert_eq!(s.bm.num_free_blocks(), s.bm.num_total_blocks());
        prop_assert_eq!(s.num_running() + s.num_waiting(), 0);
    }
}

/// vLLM's order: EOS and stop ids beat max_tokens on the last allowed token (finish
/// "stop"), the primary EOS reports no stop_reason and a further EOS its id, and both end
/// a sequence even below min_tokens (only a grammar can make the sampler pick them there).
#[test]
fn eos_and_stop_ids_win_over_length_and_report_ids() {
    let mut c = cfg(64, 8, 64);
    c.eos_token_ids = vec![2, 3];
    let mut s = Scheduler::new(c, None).unwrap();
    let p = |max_tokens, min_tokens| RequestParams {
        max_tokens,
        min_tokens,
        stop_token_ids: vec![9],
        ..Default::default()
    };
    s.add_request("primary", vec![5, 6], p(1, 0)).unwrap();
    s.add_request("second_eos", vec![5, 7], p(1, 0)).unwrap();
    s.add_request("stop_id", vec![5, 8], p(1, 0)).unwrap();
    s.add_request("length", vec![5, 9], p(1, 0)).unwrap();
    s.add_request("below_min", vec![5, 10], p(8, 4)).unwrap();
    let b = s.schedule().unwrap().unwrap();
    assert_eq!(b.num_samples, 5);
    let r = s.update(&[2, 3, 9, 4, 3], 0.0).unwrap();
    let got: std::collections::HashMap<&str, (FinishReason, StopReason)> =
        r.finished.iter().map(|f| (&*f.request_id, (f.finish_reason, f.stop_reason.clone()))).collect();
    assert_eq!(got["primary"], (FinishReason::Stop, StopReason::None));
    assert_eq!(got["second_eos"], (FinishReason::Stop, StopReason::TokenId(3)));
    assert_eq!(got["stop_id"], (FinishReason::Stop, StopReason::TokenId(9)));
    assert_eq!(got["length"], (FinishReason::Length, StopReason::None));
    assert_eq!(got["below_min"], (FinishReason::Stop, StopReason::TokenId(3)));
    assert_eq!(s.bm.num_free_blocks(), s.bm.num_total_blocks());
}

/// Constrained requests' sample rows come back with their sample indices, a fork's
/// children as 0..n, and nothing for unconstrained requests or mid-prefill rows.
#[test]
fn pending_structured_samples_name_constrained_rows() {
    let mut s = Scheduler::new(cfg(64, 8, 64), None).unwrap();
    let so = |n, max_tokens| RequestParams { structured_output: true, temperature: 1.0, ..params(n, max_tokens) };
    s.add_request("free", vec![5, 6], params(1, 4)).unwrap();
    s.add_request("json", vec![5, 7], so(1, 4)).unwrap();
    s.add_request("json_n3", vec![5, 8, 9], so(3, 4)).unwrap();
    assert_eq!(s.pending_structured_samples(), (vec![], vec![]));
    let b = s.schedule().unwrap().unwrap();
    assert_eq!(b.num_samples, 5);
    assert_eq!(s.pending_structured_samples(), (vec![1, 2, 3, 4], vec![0, 0, 1, 2]));
    s.update(&[10, 11, 12, 13, 14], 0.0).unwrap();
    assert_eq!(s.pending_structured_samples(), (vec![], vec![]));
    let b = s.schedule().unwrap().unwrap();
    let (rows, idx) = s.pending_structured_samples();
    assert_eq!(rows.len(), 4);
    let mut idx_sorted = idx.clone();
    idx_sorted.sort();
    assert_eq!(idx_sorted, vec![0, 0, 1, 2]);
    assert!(rows.iter().all(|&r| (r as usize) < b.num_samples));
}

#[test]
fn decodes_first_then_chunked_prefill() {
    let mut s = Scheduler::new(cfg(64, 8, 10), None).unwrap();
    s.add_request("a", (1..=5).collect(), params(1, 5)).unwrap();
    let b = s.schedule().unwrap().unwrap();
    assert_eq!((b.num_seqs, b.num_tokens, b.num_samples), (1, 5, 1));
    s.update(&[9], 0.0).unwrap();
    s.add_request("b", (100..130).collect(), params(1, 3)).unwrap();
    let b = s.schedule().unwrap().unwrap();
    // One decode for "a" first, then 9 prompt tokens of "b" (budget 10), no sample for b yet.
    assert_eq!((b.num_decodes, b.num_seqs, b.num_tokens, b.num_samples), (1, 2, 10, 1));
    assert_eq!(b.input_ids[0], 9);
    assert_eq!(&b.input_ids[1..], &(100..109).collect::<Vec<i64>>()[..]);
    check_batch(&s, &b);
    s.update(&[3], 0.0).unwrap();
    s.check_invariants().unwrap();
}

#[test]
fn prompts_finishing_with_n_wait_for_sample_rows() {
    // 9 prompts of n = 4 with room for 6 sample rows a step (the server's crash: 9 x n
    // rows in one step): each step finishes at most one prompt's 4 children on top of
    // the running decodes, and every child still gets all of its tokens.
    let mut s = Scheduler::new(SchedulerConfig { max_num_sample_rows: 6, ..cfg(400, 64, 512) }, None).unwrap();
    for i in 0..9 {
        s.add_request(&format!("r{i}"), vec![1, 2, 3, 4, 5, 6, i], params(4, 3)).unwrap();
    }
    assert!(s.add_request("too-many", vec![1], params(7, 3)).unwrap_err().contains("max_num_sample_rows"));
    let mut finished = 0;
    for _ in 0..200 {
        let Some(b) = s.schedule().unwrap() else { break };
        check_batch(&s, &b);
        assert!(b.num_samples <= 6, "{} sample rows", b.num_samples);
        let ids = vec![7i64; b.num_samples];
        finished += s.update(&ids, 0.0).unwrap().finished.len();
        s.check_invariants().unwrap();
    }
    assert_eq!(finished, 36);
    assert!(!s.has_unfinished());
}

#[test]
fn preemption_recomputes_with_cache_hits() {
    // 6 blocks of 4: two 9-token prompts fit (3 blocks each) until both grow.
    let mut s = Scheduler::new(cfg(6, 4, 64), None).unwrap();
    s.add_request("a", (0..9).collect(), params(1, 10)).unwrap();
    s.add_request("b", (50..59).collect(), params(1, 10)).unwrap();
    let mut done = 0;
    let mut steps = 0;
    while s.has_unfinished() {
        let b = s.schedule().unwrap().unwrap();
        check_batch(&s, &b);
        let ids = vec![1i64; b.num_samples];
        done += s.update(&ids, 0.0).unwrap().finished.len();
        s.check_invariants().unwrap();
        steps += 1;
        assert!(steps < 200);
    }
    assert_eq!(done, 2);
    assert!(s.num_preemptions > 0);
    assert!(s.prefix_cache_hit_tokens > 0, "the recompute reuses the cached prompt blocks");
    assert_eq!(s.bm.num_free_blocks(), 6);
}
