//! The metadata tree a guest reads under `/computeMetadata/v1/`, built from the registry's
//! [`VmMetadata`], and its renderings: a leaf's text, a directory listing, and the recursive
//! JSON (or `alt=text`) forms GCE's metadata server gives. Pure.
//!
//! Names are GCE's: kebab-case in paths (`network-interfaces/0/ip`), camelCase in recursive
//! JSON (`networkInterfaces`), user-chosen keys (attributes) kept as they are.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::source::VmMetadata;

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A string value.
    Text(String),
    /// A number (JSON number in recursive output).
    Number(u64),
    /// A directory of named entries; `user_keys`: the names are the user's (attributes), kept
    /// as they are in JSON instead of camelCased.
    Dir {
        /// The entries.
        entries: BTreeMap<String, Node>,
        /// Whether the names are user keys.
        user_keys: bool,
    },
    /// A numbered directory (`network-interfaces/`): a JSON array.
    List(Vec<Node>),
}

fn dir(entries: impl IntoIterator<Item = (&'static str, Node)>) -> Node {
    Node::Dir {
        entries: entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        user_keys: false,
    }
}

fn user_dir(map: &BTreeMap<String, String>) -> Node {
    Node::Dir {
        entries: map
            .iter()
            .map(|(k, v)| (k.clone(), Node::Text(v.clone())))
            .collect(),
        user_keys: true,
    }
}

fn text(s: &str) -> Node {
    Node::Text(s.to_string())
}

/// The tree of `/computeMetadata/v1/` for `md`. The dynamic leaves (`token`, `identity`) are
/// served by the router, not stored here; they are listed in `service-accounts/default/`.
pub fn build(md: &VmMetadata) -> Node {
    let i = &md.instance;
    let nic = dir([
        ("ip", text(&i.ip)),
        ("mac", text(&i.mac)),
        ("network", text(&i.network)),
        ("gateway", text(&i.gateway)),
        ("mtu", Node::Number(u64::from(i.mtu))),
    ]);
    let sa = &i.service_account;
    let default_sa = dir([
        ("aliases", text("default")),
        ("email", text(&sa.email)),
        ("scopes", Node::Text(sa.scopes.join("\n"))),
    ]);
    let mut accounts = BTreeMap::new();
    accounts.insert("default".to_string(), default_sa.clone());
    if !sa.email.is_empty() {
        accounts.insert(sa.email.clone(), default_sa);
    }
    let guest = Node::Dir {
        entries: md
            .guest_attributes
            .iter()
            .map(|(ns, keys)| (ns.clone(), user_dir(keys)))
            .collect(),
        user_keys: true,
    };
    let instance = dir([
        // GCE's instance id is a number; the registry's is one in decimal.
        (
            "id",
            i.id.parse().map_or_else(|_| text(&i.id), Node::Number),
        ),
        ("name", text(&i.name)),
        ("hostname", text(&i.hostname)),
        ("zone", text(&i.zone)),
        ("network-interfaces", Node::List(vec![nic])),
        ("attributes", user_dir(&i.attributes)),
        (
            "service-accounts",
            Node::Dir {
                entries: accounts,
                user_keys: true,
            },
        ),
        ("guest-attributes", guest),
    ]);
    let project = dir([
        ("project-id", text(&md.project.project_id)),
        ("attributes", user_dir(&md.project.attributes)),
    ]);
    dir([("instance", instance), ("project", project)])
}

impl Node {
    /// The node at `path` (segments relative to this node; empty segments ignored).
    pub fn find<'a>(&self, path: impl IntoIterator<Item = &'a str>) -> Option<&Node> {
        let mut node = self;
        for seg in path.into_iter().filter(|s| !s.is_empty()) {
            node = match node {
                Node::Dir { entries, .. } => entries.get(seg)?,
                Node::List(items) => items.get(seg.parse::<usize>().ok()?)?,
                Node::Text(_) | Node::Number(_) => return None,
            };
        }
        Some(node)
    }

    /// Whether this is a directory (listing, trailing slash).
    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Dir { .. } | Node::List(_))
    }

    /// Names of a directory's entries, directories with a trailing `/`.
    pub fn listing(&self) -> Vec<String> {
        let name = |k: String, n: &Node| if n.is_dir() { format!("{k}/") } else { k };
        match self {
            Node::Dir { entries, .. } => entries.iter().map(|(k, n)| name(k.clone(), n)).collect(),
            Node::List(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| name(i.to_string(), n))
                .collect(),
            Node::Text(_) | Node::Number(_) => Vec::new(),
        }
    }

    /// A leaf's text.
    pub fn leaf_text(&self) -> Option<String> {
        match self {
            Node::Text(s) => Some(s.clone()),
            Node::Number(n) => Some(n.to_string()),
            Node::Dir { .. } | Node::List(_) => None,
        }
    }

    /// The recursive JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            Node::Text(s) => Value::String(s.clone()),
            Node::Number(n) => Value::from(*n),
            Node::List(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Dir { entries, user_keys } => {
                let mut map = Map::new();
                for (k, v) in entries {
                    let key = if *user_keys { k.clone() } else { camel_case(k) };
                    map.insert(key, v.to_json());
                }
                Value::Object(map)
            }
        }
    }

    /// The recursive `alt=text` form: one `path value` line per leaf.
    pub fn to_text_lines(&self, prefix: &str, out: &mut String) {
        match self {
            Node::Text(_) | Node::Number(_) => {
                let value = self.leaf_text().unwrap_or_default();
                for line in value.lines() {
                    out.push_str(&format!("{prefix} {line}\n"));
                }
                if value.is_empty() {
                    out.push_str(&format!("{prefix} \n"));
                }
            }
            Node::Dir { .. } | Node::List(_) => {
                for entry in self.listing() {
                    let name = entry.trim_end_matches('/');
                    if let Some(child) = self.find([name]) {
                        let sub = if prefix.is_empty() {
                            name.to_string()
                        } else {
                            format!("{prefix}/{name}")
                        };
                        child.to_text_lines(&sub, out);
                    }
                }
            }
        }
    }
}

/// `network-interfaces` -> `networkInterfaces`.
fn camel_case(kebab: &str) -> String {
    let mut out = String::with_capacity(kebab.len());
    let mut upper = false;
    for c in kebab.chars() {
        if c == '-' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bridge::source::{InstanceMetadata, ProjectMetadata, ServiceAccount};

    pub(crate) fn sample() -> VmMetadata {
        let mut attrs = BTreeMap::new();
        attrs.insert("startup-script".to_string(), "echo hi".to_string());
        let mut keys = BTreeMap::new();
        keys.insert("ssh-ed25519".to_string(), "AAAAC3Nz".to_string());
        let mut guest = BTreeMap::new();
        guest.insert("hostkeys".to_string(), keys);
        VmMetadata {
            etag: "e1".into(),
            instance: InstanceMetadata {
                id: "vm-a".into(),
                name: "vm-a".into(),
                hostname: "vm-a".into(),
                zone: "zone-1".into(),
                ip: "10.0.0.2".into(),
                mac: "02:00:00:00:00:02".into(),
                network: "net1".into(),
                gateway: "10.0.0.1".into(),
                mtu: 1452,
                attributes: attrs,
                service_account: ServiceAccount {
                    email: "vm-a@net1.vnp".into(),
                    scopes: vec!["https://www.googleapis.com/auth/cloud-platform".into()],
                },
            },
            project: ProjectMetadata {
                project_id: "proj".into(),
                attributes: BTreeMap::new(),
                require_session_token: false,
            },
            guest_attributes: guest,
        }
    }

    #[test]
    fn paths_listings_and_json() {
        let t = build(&sample());
        let ip = t.find("instance/network-interfaces/0/ip".split('/'));
        assert_eq!(ip.and_then(Node::leaf_text).as_deref(), Some("10.0.0.2"));
        assert_eq!(
            t.find(["instance"]).unwrap().listing(),
            [
                "attributes/",
                "guest-attributes/",
                "hostname",
                "id",
                "name",
                "network-interfaces/",
                "service-accounts/",
                "zone"
            ]
        );
        assert_eq!(
            t.find("instance/network-interfaces".split('/'))
                .unwrap()
                .listing(),
            ["0/"]
        );
        assert!(t.find("instance/nope".split('/')).is_none());
        assert!(t.find("instance/id/deeper".split('/')).is_none());
        let json = t.find(["instance"]).unwrap().to_json();
        assert_eq!(json["networkInterfaces"][0]["mtu"], 1452);
        assert_eq!(json["attributes"]["startup-script"], "echo hi");
        assert_eq!(
            json["guestAttributes"]["hostkeys"]["ssh-ed25519"],
            "AAAAC3Nz"
        );
        assert_eq!(json["serviceAccounts"]["default"]["email"], "vm-a@net1.vnp");
        let mut lines = String::new();
        t.find("instance/network-interfaces".split('/'))
            .unwrap()
            .to_text_lines("", &mut lines);
        assert!(lines.contains("0/ip 10.0.0.2\n"), "{lines}");
    }
}
