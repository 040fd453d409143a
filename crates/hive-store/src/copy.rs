//! Copying every key of one store into another, empty one (`hive store migrate`).
//!
//! Values are copied byte for byte; revisions are the destination's own, so they renumber
//! (in etcd they start at 2, and keys written in one batch share a revision). The source must
//! not change meanwhile: every page of it must be read at the revision the copy started at.
//! After the copy both stores are walked again side by side and must hold the same keys and
//! values.
//!
//! This module only moves keys and bytes; it does not know what they mean.

use bytes::Bytes;

use crate::{KeyValue, MAX_TXN_OPS, Op, Result, Revision, Store, StoreError};

/// Keys read per page of the source.
const PAGE: usize = 500;
/// Most bytes of keys and values per destination transaction, below etcd's default request
/// limit (1.5 MiB); a single larger key is sent alone.
const BATCH_BYTES: usize = 1024 * 1024;
/// Attempts at one batch whose outcome stays unknown.
const ATTEMPTS: usize = 5;

/// What [`copy_all`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyReport {
    pub keys: usize,
    /// Bytes of keys and values.
    pub bytes: u64,
    /// The source's revision, which it kept during the copy.
    pub source_revision: Revision,
    /// The destination's revision after the copy.
    pub destination_revision: Revision,
}

/// Copies every key of `from` into `to`, which must hold no key at all, then checks that both
/// hold the same keys and values.
pub async fn copy_all(from: &dyn Store, to: &dyn Store) -> Result<CopyReport> {
    if let Some(kv) = to.list("", None, 1).await?.kvs.first() {
        return Err(StoreError::Invalid(format!(
            "the destination is not empty (it holds {}): copy into an empty store",
            kv.key
        )));
    }
    let source_revision = from.current_revision().await?;
    let mut report = CopyReport {
        keys: 0,
        bytes: 0,
        source_revision,
        destination_revision: 0,
    };
    let mut batch: Vec<(String, Bytes)> = Vec::new();
    let mut batch_bytes = 0;
    let mut after: Option<String> = None;
    loop {
        let page = source_page(from, after.as_deref(), source_revision).await?;
        for kv in page.kvs {
            let size = kv.key.len() + kv.value.len();
            if !batch.is_empty() && (batch.len() == MAX_TXN_OPS || batch_bytes + size > BATCH_BYTES)
            {
                write_batch(to, std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            report.keys += 1;
            report.bytes += size as u64;
            batch_bytes += size;
            after = Some(kv.key.clone());
            batch.push((kv.key, kv.value));
        }
        if !page.more {
            break;
        }
    }
    if !batch.is_empty() {
        write_batch(to, batch).await?;
    }
    verify(from, to, source_revision).await?;
    report.destination_revision = to.current_revision().await?;
    Ok(report)
}

async fn source_page(
    from: &dyn Store,
    after: Option<&str>,
    revision: Revision,
) -> Result<crate::ListResponse> {
    let page = from.list("", after, PAGE).await?;
    if page.revision != revision {
        return Err(StoreError::Invalid(format!(
            "the source changed during the copy (revision {revision}, now {}): stop whatever \
             writes to it and copy again into an empty store",
            page.revision
        )));
    }
    Ok(page)
}

/// Creates the batch's keys in one transaction. When the outcome is unknown, the first key
/// says whether the (atomic) transaction was applied; if not, it is sent again.
async fn write_batch(to: &dyn Store, batch: Vec<(String, Bytes)>) -> Result<()> {
    let ops: Vec<Op> = batch
        .iter()
        .map(|(key, value)| Op::Create {
            key: key.clone(),
            value: value.clone(),
        })
        .collect();
    let (first_key, first_value) = &batch[0];
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        match to.txn(ops.clone()).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Unavailable(why)) => last = why,
            Err(other) => return Err(other),
        }
        match to.get(first_key).await?.kv {
            Some(kv) if kv.value == *first_value => return Ok(()),
            Some(_) => {
                return Err(StoreError::Invalid(format!(
                    "{first_key} appeared in the destination with another value: something \
                     else writes to it"
                )));
            }
            None => {
                tracing::warn!(key = %first_key, error = %last, "copy batch lost, sending again")
            }
        }
    }
    Err(StoreError::Unavailable(format!(
        "copy batch starting at {first_key}: {last}"
    )))
}

/// Walks both stores side by side: same keys, same values.
async fn verify(from: &dyn Store, to: &dyn Store, source_revision: Revision) -> Result<()> {
    let mut after: Option<String> = None;
    loop {
        let source = source_page(from, after.as_deref(), source_revision).await?;
        let copied = to.list("", after.as_deref(), PAGE).await?;
        let differs =
            |what: &str, key: &str| StoreError::Backend(format!("after the copy, {what} {key}"));
        for (index, kv) in source.kvs.iter().enumerate() {
            match copied.kvs.get(index) {
                Some(KeyValue { key, value, .. }) if *key == kv.key && *value == kv.value => {}
                Some(KeyValue { key, .. }) if *key == kv.key => {
                    return Err(differs("the destination has another value for", key));
                }
                _ => return Err(differs("the destination lacks", &kv.key)),
            }
        }
        if copied.kvs.len() > source.kvs.len() {
            let extra = &copied.kvs[source.kvs.len()].key;
            return Err(differs("the destination has the extra key", extra));
        }
        if !source.more {
            if copied.more {
                let last = copied.kvs.last().map_or("", |kv| kv.key.as_str());
                return Err(differs("the destination has keys after", last));
            }
            return Ok(());
        }
        after = source.kvs.last().map(|kv| kv.key.clone());
    }
}
