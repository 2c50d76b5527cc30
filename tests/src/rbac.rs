//! Kubernetes RBAC, evaluated as the API server does, for the requests the fake API server saw:
//! a test renders the chart's Roles and bindings and checks that every request the agent made is
//! allowed to the agent's ServiceAccount, and nothing more is granted than it uses.

use serde_json::Value;
use std::collections::BTreeSet;

/// What the authorizer sees of a request (the API server's RequestInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// "" for the core group.
    pub group: String,
    /// Plural resource.
    pub resource: String,
    /// "" for cluster-scoped requests.
    pub namespace: String,
    /// The object's name: from the path, or for list and watch from a `metadata.name` field
    /// selector, as the API server takes it for `resourceNames`.
    pub name: String,
}

/// Maps a request (method, URL path, raw query) to its attributes.
pub fn attributes(method: &str, path: &str, query: &str) -> Attributes {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("not a resource path: {path}"),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        _ => ("", rest),
    };
    let (resource, mut name) = match rest {
        [resource] => (*resource, String::new()),
        [resource, name] => (*resource, (*name).to_owned()),
        _ => panic!("unexpected path: {path}"),
    };
    let param = |key: &str| {
        query.split('&').find_map(|p| {
            p.strip_prefix(key)
                .and_then(|v| v.strip_prefix('='))
                .map(|v| v.replace("%3D", "=").replace("%2F", "/"))
        })
    };
    let verb = match (method, name.is_empty()) {
        ("GET", true) if param("watch").as_deref() == Some("true") => "watch",
        ("GET", true) => "list",
        ("GET", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => panic!("unexpected method {method}"),
    };
    if name.is_empty()
        && let Some(sel) = param("fieldSelector")
        && let Some(n) = sel.strip_prefix("metadata.name=")
        && !n.contains(',')
    {
        name = n.to_owned();
    }
    Attributes {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        namespace: namespace.into(),
        name,
    }
}

fn covers(list: &Value, want: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|v| v == "*" || v == want))
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    covers(&rule["apiGroups"], &a.group)
        && covers(&rule["resources"], &a.resource)
        && covers(&rule["verbs"], &a.verb)
        && match rule["resourceNames"].as_array() {
            None => true,
            Some(names) if names.is_empty() => true,
            Some(names) => !a.name.is_empty() && names.iter().any(|n| n == a.name.as_str()),
        }
}

/// The rules bound to a ServiceAccount in `objects`, each with the namespace it applies in
/// (`None`: every namespace, from a ClusterRoleBinding).
pub fn rules_of<'a>(
    objects: &'a [Value],
    namespace: &str,
    account: &str,
) -> Vec<(Option<String>, &'a Value)> {
    let mut out = Vec::new();
    for b in objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
    {
        let bound = b["subjects"].as_array().is_some_and(|s| {
            s.iter().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == namespace
            })
        });
        if !bound {
            continue;
        }
        let scope = (b["kind"] == "RoleBinding").then(|| {
            b["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        });
        let role = objects
            .iter()
            .find(|o| {
                o["kind"] == b["roleRef"]["kind"]
                    && o["metadata"]["name"] == b["roleRef"]["name"]
                    && (o["kind"] == "ClusterRole"
                        || o["metadata"]["namespace"] == b["metadata"]["namespace"])
            })
            .unwrap_or_else(|| panic!("binding {} names a missing role", b["metadata"]["name"]));
        for r in role["rules"].as_array().into_iter().flatten() {
            out.push((scope.clone(), r));
        }
    }
    out
}

/// Whether `rules` (from [`rules_of`]) allow the request.
pub fn allows(rules: &[(Option<String>, &Value)], a: &Attributes) -> bool {
    rules.iter().any(|(scope, rule)| {
        scope.as_ref().is_none_or(|ns| *ns == a.namespace) && rule_allows(rule, a)
    })
}

/// Every (group, resource, verb) that `rules` grant, to compare with what was used.
pub fn grants(rules: &[(Option<String>, &Value)]) -> BTreeSet<(String, String, String)> {
    let list = |rule: &Value, key: &str| -> Vec<String> {
        rule[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let mut out = BTreeSet::new();
    for (_, rule) in rules {
        for g in list(rule, "apiGroups") {
            for r in list(rule, "resources") {
                for v in list(rule, "verbs") {
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}
