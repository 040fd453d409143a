//! Tenant-exclusive nodes, held by the API server: an instance is never bound to a node
//! bound to another tenant, and a node is never bound to a tenant while it still runs
//! another tenant's containers. The scheduler never asks for either; these refuse what an
//! operator (or a scheduler with a stale view) would otherwise write. The node's agent checks
//! again before it starts anything (a binding and a node change racing past both checks).
//!
//! Neither check names the other tenant: the message says the node is taken, not by whom.

use hive_api::{ErrorCode, Instance, Node};

use crate::error::{ApiError, ApiResult};
use crate::keys;
use crate::resources::decode;
use crate::state::AppState;

/// Refuses binding `inst` of `tenant` to a node bound to another tenant. Only a new binding
/// is checked (`stored_node` is where the stored instance was bound): an instance already on
/// its node stays there whatever happens to the node. A node that does not exist (yet) is
/// not refused: its agent, when it registers, decides.
pub async fn instance_bound(
    st: &AppState,
    tenant: Option<&str>,
    stored_node: Option<&str>,
    inst: &Instance,
) -> ApiResult<()> {
    let (Some(tenant), Some(node)) = (tenant, inst.spec.node.as_deref()) else {
        return Ok(());
    };
    if stored_node == Some(node) {
        return Ok(());
    }
    let Some(kv) = st.store.get(&keys::object::<Node>(None, node)).await?.kv else {
        return Ok(());
    };
    let n: Node = decode(&kv)?;
    match n.spec.tenant.as_deref() {
        Some(bound) if bound != tenant => Err(ApiError::new(
            ErrorCode::NodeTaken,
            format!(
                "spec.node: node {node:?} is bound to another tenant; instance {:?} cannot run there",
                inst.name
            ),
        )),
        _ => Ok(()),
    }
}

/// Refuses binding `node` to a tenant while its agent reports containers of another tenant
/// (they would keep running on a node that is no longer theirs): drain it first (cordon,
/// move or delete what runs there, wait for the report to empty).
pub fn node_updated(stored: &Node, node: &Node) -> ApiResult<()> {
    let Some(tenant) = node.spec.tenant.as_deref() else {
        return Ok(());
    };
    if stored.spec.tenant.as_deref() == Some(tenant) {
        return Ok(());
    }
    let others: u32 = stored
        .status
        .containers
        .iter()
        .filter(|(t, _)| t.as_str() != tenant)
        .map(|(_, n)| n)
        .sum();
    if others > 0 {
        return Err(ApiError::new(
            ErrorCode::NodeTaken,
            format!(
                "spec.tenant: node {:?} still runs {others} container(s) of other tenants; \
                 cordon it and wait until they are gone before binding it to {tenant:?}",
                node.name
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(tenant: Option<&str>, containers: &[(&str, u32)]) -> Node {
        let mut n = Node {
            name: "n1".into(),
            ..Default::default()
        };
        n.spec.tenant = tenant.map(Into::into);
        n.status.containers = containers.iter().map(|(t, c)| ((*t).into(), *c)).collect();
        n
    }

    #[test]
    fn a_node_is_bound_only_when_no_other_tenant_runs_there() {
        let busy = node(None, &[("red", 2), ("blue", 1)]);
        let e = node_updated(&busy, &node(Some("red"), &[])).unwrap_err();
        assert_eq!(e.code, ErrorCode::NodeTaken);
        assert!(
            e.message.contains("1 container(s) of other tenants"),
            "{e:?}"
        );
        assert!(!e.message.contains("blue"), "names the other tenant: {e:?}");

        let red_only = node(None, &[("red", 2)]);
        node_updated(&red_only, &node(Some("red"), &[])).unwrap();
        // Unchanged binding, or back to the pool: nothing to check.
        let bound = node(Some("red"), &[("blue", 1)]);
        node_updated(&bound, &node(Some("red"), &[])).unwrap();
        node_updated(&bound, &node(None, &[])).unwrap();
        // Rebinding a node from one tenant to another while the first still runs there.
        let e =
            node_updated(&node(Some("red"), &[("red", 1)]), &node(Some("blue"), &[])).unwrap_err();
        assert!(e.message.contains("\"blue\""), "{e:?}");
    }
}
