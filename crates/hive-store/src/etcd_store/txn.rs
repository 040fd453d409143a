//! A [`crate::Op`] transaction as one etcd txn, and its answer as a [`crate::TxnResponse`] or a
//! [`crate::StoreError::Conflict`].
//!
//! Conditions become compares; writes are sorted by key, so that etcd (which emits the events
//! of a txn in the order of its operations) gives the events of one revision in key order.
//! Reordering is safe because a valid transaction never names one key twice. When a compare
//! fails, etcd runs the failure branch instead, which reads every compared key: the conflict is
//! then decided on the very snapshot the compares saw, in the caller's order of operations.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::{header_revision, prefix_range, revision_from};
use crate::{ConflictKind, Op, Result, Revision, StoreError};

/// What a condition expects of its key.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// `Create`: the key does not exist.
    Absent,
    /// `Delete` without a revision: the key exists.
    Present,
    /// `Update`, `Delete` with a revision, `Require`: the key exists at exactly this revision.
    At(Revision),
}

#[derive(Debug)]
struct Check {
    key: String,
    expect: Expect,
}

/// An etcd txn built from Hive ops, with what is needed to explain its failure.
#[derive(Debug)]
pub(super) struct Plan {
    checks: Vec<Check>,
    request: Txn,
}

impl Plan {
    /// `ops` must have passed [`crate::validate_ops`].
    pub(super) fn new(ops: &[Op]) -> Self {
        let mut checks = Vec::new();
        for op in ops {
            let expect = match op {
                Op::Create { .. } => Expect::Absent,
                Op::Delete {
                    mod_revision: None, ..
                } => Expect::Present,
                Op::Update { mod_revision, .. }
                | Op::Require { mod_revision, .. }
                | Op::Delete {
                    mod_revision: Some(mod_revision),
                    ..
                } => Expect::At(*mod_revision),
                Op::Put { .. } | Op::DeletePrefix { .. } => continue,
            };
            checks.push(Check {
                key: op.key().to_owned(),
                expect,
            });
        }
        let compares: Vec<Compare> = checks.iter().map(compare).collect();

        let mut writes: Vec<(&str, TxnOp)> = ops
            .iter()
            .filter_map(|op| write(op).map(|w| (op.key(), w)))
            .collect();
        writes.sort_by(|a, b| a.0.cmp(b.0));
        let success: Vec<TxnOp> = writes.into_iter().map(|(_, w)| w).collect();

        let failure: Vec<TxnOp> = checks
            .iter()
            .map(|check| TxnOp::get(check.key.as_str(), Some(GetOptions::new().with_keys_only())))
            .collect();
        let request = Txn::new().when(compares).and_then(success).or_else(failure);
        Self { checks, request }
    }

    pub(super) fn request(&self) -> Txn {
        self.request.clone()
    }

    /// The transaction's revision, or the first condition (in the caller's order) that did
    /// not hold on the snapshot etcd evaluated.
    pub(super) fn outcome(&self, response: &TxnResponse) -> Result<crate::TxnResponse> {
        if response.succeeded() {
            return Ok(crate::TxnResponse {
                revision: header_revision(response.header())?,
            });
        }
        let reads = response.op_responses();
        if reads.len() != self.checks.len() {
            return Err(StoreError::Backend(format!(
                "etcd txn failed with {} reads for {} conditions",
                reads.len(),
                self.checks.len()
            )));
        }
        for (check, read) in self.checks.iter().zip(reads) {
            let TxnOpResponse::Get(read) = read else {
                return Err(StoreError::Backend(
                    "etcd txn failure branch answered with a write".into(),
                ));
            };
            let found = match read.kvs().first() {
                Some(kv) => Some(revision_from(kv.mod_revision())?),
                None => None,
            };
            let kind = match (check.expect, found) {
                (Expect::Absent, Some(mod_revision)) => ConflictKind::Exists { mod_revision },
                (Expect::Present | Expect::At(_), None) => ConflictKind::Missing,
                (Expect::At(expected), Some(actual)) if actual != expected => {
                    ConflictKind::RevisionMismatch { expected, actual }
                }
                _ => continue,
            };
            return Err(StoreError::Conflict {
                key: check.key.clone(),
                kind,
            });
        }
        Err(StoreError::Backend(
            "etcd txn failed although every condition holds on its snapshot".into(),
        ))
    }
}

fn compare(check: &Check) -> Compare {
    let key = check.key.as_str();
    match check.expect {
        Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
        Expect::Present => Compare::version(key, CompareOp::Greater, 0),
        Expect::At(revision) => match i64::try_from(revision) {
            // A missing key compares as mod_revision 0, so 0 must not match it.
            Ok(revision) if revision > 0 => Compare::mod_revision(key, CompareOp::Equal, revision),
            // No key is at revision 0 (or beyond etcd's range): a compare that never holds.
            _ => Compare::version(key, CompareOp::Less, 0),
        },
    }
}

/// The write of an op; a `Require` writes nothing.
fn write(op: &Op) -> Option<TxnOp> {
    Some(match op {
        Op::Create { key, value } | Op::Update { key, value, .. } | Op::Put { key, value } => {
            TxnOp::put(key.as_str(), value.to_vec(), None)
        }
        Op::Delete { key, .. } => TxnOp::delete(key.as_str(), None),
        Op::DeletePrefix { prefix } => {
            let (from, end) = prefix_range(prefix);
            TxnOp::delete(from, Some(DeleteOptions::new().with_range(end)))
        }
        Op::Require { .. } => return None,
    })
}
