//! Log-likelihood of a continuation given a context, as lm-evaluation-harness computes it for
//! `loglikelihood` requests (`HFLM._loglikelihood_tokens`):
//!
//! - the pair is tokenized by `_encode_pair`: trailing spaces of the context move to the
//!   continuation, `context + continuation` is tokenized whole and the continuation is what follows
//!   the tokenized context; an empty context is replaced by the prefix token (BOS, else EOS);
//! - the model reads `(context + continuation)[-(max_length + 1):][:-1]` (right-padded batches);
//! - the log-likelihood is the sum over continuation tokens of `log_softmax(logits)` at the
//!   positions predicting them, and `is_greedy` says whether each of them is the argmax.
//!
//! Only the continuation's positions are projected onto the vocabulary.

use crate::error::EvalError;
use crate::model::EvalModel;
use crate::progress::Progress;
use alignment_models::Batch;
use burn::tensor::{activation::log_softmax, backend::Backend, Int, Tensor, TensorData};

/// One `(context, continuation)` pair to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoglikelihoodRequest {
    /// The conditioning text (may be empty).
    pub context: String,
    /// The text whose probability is measured.
    pub continuation: String,
}

/// The score of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loglikelihood {
    /// `Σ log p(continuation token | everything before it)`, in nats.
    pub logprob: f64,
    /// Whether every continuation token is the model's most likely next token.
    pub is_greedy: bool,
    /// Number of continuation tokens scored.
    pub num_tokens: usize,
}

impl<B: Backend> EvalModel<B> {
    /// lm-evaluation-harness' tokenization of a request: `(context tokens, continuation tokens)`.
    pub fn encode_pair(&self, request: &LoglikelihoodRequest, location: &str) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
        let (context, continuation) = (request.context.as_str(), request.continuation.as_str());
        if context.is_empty() {
            let continuation = self.encode_with(continuation, false, location)?;
            let prefix = self.prefix_token_id();
            return Ok(match continuation.first() {
                Some(&first) if first == prefix => (vec![first], continuation[1..].to_vec()),
                _ => (vec![prefix], continuation),
            });
        }
        let trimmed = context.trim_end();
        let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
        let whole = self.encode(&format!("{context}{continuation}"), location)?;
        let context_ids = self.encode(context, location)?;
        let split = context_ids.len().min(whole.len());
        Ok((context_ids, whole[split..].to_vec()))
    }

    /// The token lm-evaluation-harness puts before a continuation with no context: BOS, else EOS.
    pub fn prefix_token_id(&self) -> u32 {
        let id = |t: Option<&str>| t.and_then(|t| self.tokenizer.token_to_id(t));
        id(self.template.bos_token()).or(self.model.config.bos_token_id).or(id(self.template.eos_token())).unwrap_or(0)
    }

    /// Scores every request, [`EvalModel::batch_size`] at a time (longest first, as the harness
    /// orders them). `progress` advances by one per request.
    pub fn loglikelihood(&self, requests: &[LoglikelihoodRequest], progress: &Progress) -> Result<Vec<Loglikelihood>, EvalError> {
        let pairs = requests
            .iter()
            .enumerate()
            .map(|(i, r)| self.encode_pair(r, &format!("loglikelihood request {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        self.loglikelihood_tokens(&pairs, progress)
    }

    /// [`Self::loglikelihood`] of already tokenized `(context, continuation)` pairs.
    pub fn loglikelihood_tokens(&self, pairs: &[(Vec<u32>, Vec<u32>)], progress: &Progress) -> Result<Vec<Loglikelihood>, EvalError> {
        if let Some(i) = pairs.iter().position(|(c, t)| c.is_empty() || t.is_empty()) {
            return Err(EvalError::Config(format!("loglikelihood request {i}: the context and the continuation need a token each")));
        }
        let max_length = self.model.config.max_position_embeddings.max(1);
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(pairs[i].0.len() + pairs[i].1.len()));
        let mut results = vec![None; pairs.len()];
        for chunk in order.chunks(self.batch_size.max(1)) {
            let rows: Vec<(Vec<u32>, &[u32])> = chunk
                .iter()
                .map(|&i| {
                    let (context, continuation) = &pairs[i];
                    let whole: Vec<u32> = context.iter().chain(continuation).copied().collect();
                    let start = whole.len().saturating_sub(max_length + 1);
                    (whole[start..whole.len() - 1].to_vec(), continuation.as_slice())
                })
                .collect();
            for (&i, score) in chunk.iter().zip(self.score_rows(&rows)) {
                results[i] = Some(score);
            }
            progress.inc(chunk.len() as u64);
        }
        Ok(results.into_iter().map(|r| r.expect("every request is in one chunk")).collect())
    }

    /// One right-padded forward pass over `rows` (`(input, continuation)`, the continuation being
    /// predicted by the last `continuation.len()` positions of the input).
    fn score_rows(&self, rows: &[(Vec<u32>, &[u32])]) -> Vec<Loglikelihood> {
        let device = self.model.embed_tokens.device();
        let width = rows.iter().map(|(input, _)| input.len()).max().unwrap_or(0);
        // Right padding needs no mask: causal attention keeps it out of the real positions.
        let padded: Vec<Vec<u32>> =
            rows.iter().map(|(input, _)| input.iter().copied().chain(std::iter::repeat_n(0, width - input.len())).collect()).collect();
        let hidden = self.model.hidden_states(&Batch::from_ids(padded), None);
        let [batch, _, dim] = hidden.dims();
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (r, (input, continuation)) in rows.iter().enumerate() {
            // A continuation longer than the window keeps its last `input.len()` tokens' worth.
            let scored = continuation.len().min(input.len());
            let first = input.len() - scored;
            positions.extend((first..input.len()).map(|p| (r * width + p) as i64));
            targets.extend(continuation[continuation.len() - scored..].iter().map(|&t| t as i64));
        }
        let n = positions.len();
        let positions = Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [n]), &device);
        let selected = hidden.reshape([batch * width, dim]).select(0, positions).reshape([1, n, dim]);
        let logits = self.model.project(selected);
        let greedy: Vec<i64> = logits.clone().argmax(2).into_data().convert::<i64>().into_vec().expect("i64 after convert");
        let targets_tensor = Tensor::<B, 3, Int>::from_data(TensorData::new(targets.clone(), [1, n, 1]), &device);
        let logps: Vec<f32> =
            log_softmax(logits, 2).gather(2, targets_tensor).into_data().convert::<f32>().into_vec().expect("f32 after convert");
        let mut offset = 0;
        rows.iter()
            .map(|(input, continuation)| {
                let scored = continuation.len().min(input.len());
                let range = offset..offset + scored;
                offset += scored;
                Loglikelihood {
                    logprob: logps[range.clone()].iter().map(|&x| x as f64).sum(),
                    is_greedy: range.clone().all(|k| greedy[k] == targets[k]),
                    num_tokens: scored,
                }
            })
            .collect()
    }
}
