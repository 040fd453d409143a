//! Objects as the API shows them, kept in the JSON they were last rendered to: a read of an
//! object unchanged since (same key, same revision) answers those bytes instead of decoding
//! the stored value and encoding it again. Like the Kubernetes API server's serialization
//! cache, it is what makes reads from the watch cache cheap over HTTP: a list page of 100
//! objects is then a copy, not 100 decodes and encodes.
//!
//! An entry is used only for the exact revision it was rendered from, so it can never show
//! an object other than as the store holds it. It is bounded by bytes and simply emptied when
//! full (rendering again is only the work it saves).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::{BufMut, Bytes, BytesMut};
use hive_api::Resource;
use hive_store::{KeyValue, Revision};

use crate::error::ApiResult;
use crate::resources::{decode, encode};

/// Values derived from stored objects, one per key, each used only for the exact revision
/// it was derived from; bounded by a weight (emptied when it would pass it: deriving again
/// is only the work it saves).
#[derive(Debug)]
struct ByRevision<V> {
    inner: RwLock<Entries<V>>,
    max_weight: usize,
    weight: fn(&V) -> usize,
}

#[derive(Debug)]
struct Entries<V> {
    values: HashMap<String, (Revision, V)>,
    weight: usize,
}

impl<V: Clone> ByRevision<V> {
    fn new(max_weight: usize, weight: fn(&V) -> usize) -> Self {
        Self {
            inner: RwLock::new(Entries {
                values: HashMap::new(),
                weight: 0,
            }),
            max_weight,
            weight,
        }
    }

    /// The value for `kv` at its revision: kept, or made by `derive` and kept.
    fn get_or(&self, kv: &KeyValue, derive: impl FnOnce() -> ApiResult<V>) -> ApiResult<V> {
        {
            let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
            if let Some((rev, v)) = inner.values.get(&kv.key)
                && *rev == kv.mod_revision
            {
                return Ok(v.clone());
            }
        }
        let v = derive()?;
        let w = (self.weight)(&v);
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if inner.weight + w > self.max_weight {
            inner.values.clear();
            inner.weight = 0;
        }
        inner.weight += w;
        if let Some((_, old)) = inner
            .values
            .insert(kv.key.clone(), (kv.mod_revision, v.clone()))
        {
            inner.weight -= (self.weight)(&old);
        }
        Ok(v)
    }
}

/// Bytes of rendered JSON kept before the cache starts over.
const MAX_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub struct Rendered(ByRevision<Bytes>);

impl Default for Rendered {
    fn default() -> Self {
        Self(ByRevision::new(MAX_BYTES, Bytes::len))
    }
}

impl Rendered {
    /// The JSON of the object `kv` holds, as a `R` with its revision (what
    /// `serde_json::to_vec(&decode::<R>(kv))` gives).
    pub fn json<R: Resource>(&self, kv: &KeyValue) -> ApiResult<Bytes> {
        self.0.get_or(kv, || encode(&decode::<R>(kv)?))
    }

    /// A list page's JSON (`hive_api::List<R>`) of the objects in `kvs`.
    pub fn list<R: Resource>(
        &self,
        kvs: &[KeyValue],
        revision: Revision,
        continue_: Option<&str>,
    ) -> ApiResult<Bytes> {
        let items = kvs
            .iter()
            .map(|kv| self.json::<R>(kv))
            .collect::<ApiResult<Vec<Bytes>>>()?;
        let mut out =
            BytesMut::with_capacity(items.iter().map(|b| b.len() + 1).sum::<usize>() + 64);
        out.put_slice(b"{\"items\":[");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            out.put_slice(item);
        }
        out.put_slice(format!("],\"revision\":{revision}").as_bytes());
        if let Some(c) = continue_ {
            out.put_slice(b",\"continue\":");
            // A name: valid JSON as a string once quoted (serde escapes anything it must).
            out.put_slice(&serde_json::to_vec(c).unwrap_or_default());
        }
        out.put_u8(b'}');
        Ok(out.freeze())
    }
}

/// Objects kept decoded before the cache starts over.
const MAX_DECODED: usize = 100_000;

/// Objects decoded once per revision (the tenants every request checks its token against):
/// shared, never changed, used only for the exact revision they were decoded from.
#[derive(Debug)]
pub struct Decoded<R>(ByRevision<Arc<R>>);

impl<R> Default for Decoded<R> {
    fn default() -> Self {
        Self(ByRevision::new(MAX_DECODED, |_| 1))
    }
}

impl<R: Resource> Decoded<R> {
    /// The object `kv` holds, with its revision.
    pub fn get(&self, kv: &KeyValue) -> ApiResult<Arc<R>> {
        self.0.get_or(kv, || decode::<R>(kv).map(Arc::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hive_api::{List, Service};

    fn kv(name: &str, rev: Revision, replicas: u32) -> KeyValue {
        let mut s = Service {
            name: name.into(),
            ..Default::default()
        };
        s.spec.replicas = replicas;
        KeyValue {
            key: format!("/t/a/services/{name}"),
            value: serde_json::to_vec(&s).unwrap().into(),
            create_revision: 1,
            mod_revision: rev,
        }
    }

    #[test]
    fn same_bytes_as_encoding_the_decoded_object_and_never_a_stale_revision() {
        let r = Rendered::default();
        let a = kv("a", 5, 1);
        let first = r.json::<Service>(&a).unwrap();
        assert_eq!(first, encode(&decode::<Service>(&a).unwrap()).unwrap());
        assert_eq!(r.json::<Service>(&a).unwrap(), first, "cached");
        let changed = kv("a", 9, 3);
        let s: Service = serde_json::from_slice(&r.json::<Service>(&changed).unwrap()).unwrap();
        assert_eq!(
            (s.revision, s.spec.replicas),
            (9, 3),
            "a new revision renders again"
        );
    }

    #[test]
    fn decoded_once_per_revision() {
        let d = Decoded::<Service>::default();
        let a = kv("a", 5, 1);
        let first = d.get(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &d.get(&a).unwrap()));
        assert_eq!(*first, decode::<Service>(&a).unwrap());
        let later = d.get(&kv("a", 6, 4)).unwrap();
        assert_eq!((later.revision, later.spec.replicas), (6, 4));
    }

    #[test]
    fn a_list_page_is_what_serde_makes_of_the_list() {
        let r = Rendered::default();
        let kvs = vec![kv("a", 5, 1), kv("b", 6, 2)];
        for cont in [None, Some("b")] {
            let bytes = r.list::<Service>(&kvs, 42, cont).unwrap();
            let got: List<Service> = serde_json::from_slice(&bytes).unwrap();
            let want = List {
                items: kvs
                    .iter()
                    .map(|kv| decode::<Service>(kv).unwrap())
                    .collect(),
                revision: 42,
                continue_: cont.map(Into::into),
            };
            assert_eq!(got, want);
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v, serde_json::to_value(&want).unwrap());
        }
        let empty: List<Service> =
            serde_json::from_slice(&r.list::<Service>(&[], 7, None).unwrap()).unwrap();
        assert!(empty.items.is_empty() && empty.revision == 7 && empty.continue_.is_none());
    }
}
