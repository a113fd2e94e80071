//! The revision graph: parents resolved, checked for duplicates, missing parents and
//! cycles, and ordered.
//!
//! History is a graph, not a line: two branches that meet in version control become two
//! heads, and a merge revision (two or more parents) joins them again. Every walk here is
//! deterministic: among revisions that are ready at the same time, the smaller id goes
//! first.

use std::collections::{BTreeSet, HashMap};

use crate::error::Error;
use crate::source::{Revision, compare_ids};

/// The checked revision graph.
#[derive(Debug)]
pub struct Graph {
    revisions: Vec<Revision>,
    parents: Vec<Vec<usize>>,
    children: Vec<Vec<usize>>,
    index: HashMap<String, usize>,
    /// Every revision, parents before children.
    topological: Vec<usize>,
}

impl Graph {
    /// Builds the graph from revisions sorted by id (as [`crate::source::read_dir`] returns
    /// them). A revision without a `parents` directive follows the previous one in id order.
    pub fn new(mut revisions: Vec<Revision>) -> Result<Graph, Error> {
        revisions.sort_by(|a, b| compare_ids(&a.id, &b.id));
        let mut index = HashMap::new();
        for (i, revision) in revisions.iter().enumerate() {
            if let Some(previous) = index.insert(revision.id.clone(), i) {
                return Err(Error::DuplicateId {
                    id: revision.id.clone(),
                    first: revisions[previous].path.clone(),
                    second: revision.path.clone(),
                });
            }
        }
        let mut parents = Vec::with_capacity(revisions.len());
        for (i, revision) in revisions.iter().enumerate() {
            let resolved = match &revision.declared_parents {
                None => i.checked_sub(1).into_iter().collect(),
                Some(ids) => {
                    let mut resolved = Vec::with_capacity(ids.len());
                    for id in ids {
                        let parent = *index
                            .get(id)
                            .ok_or_else(|| Error::MissingParent { path: revision.path.clone(), parent: id.clone() })?;
                        if !resolved.contains(&parent) {
                            resolved.push(parent);
                        }
                    }
                    resolved
                }
            };
            parents.push(resolved);
        }
        let mut children = vec![Vec::new(); revisions.len()];
        for (child, ps) in parents.iter().enumerate() {
            for &parent in ps {
                children[parent].push(child);
            }
        }
        let topological = topological_order(&parents, &children).map_err(|stuck| Error::Cycle {
            ids: cycle_through(&parents, &stuck).into_iter().map(|i| revisions[i].id.clone()).collect(),
        })?;
        Ok(Graph { revisions, parents, children, index, topological })
    }

    /// All revisions, sorted by id.
    pub fn revisions(&self) -> &[Revision] {
        &self.revisions
    }

    /// The revision at `index`.
    pub fn revision(&self, index: usize) -> &Revision {
        &self.revisions[index]
    }

    /// The index of the revision with this id.
    pub fn find(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The parents of the revision at `index`, as resolved.
    pub fn parents(&self, index: usize) -> &[usize] {
        &self.parents[index]
    }

    /// Every revision, parents before children.
    pub fn topological(&self) -> &[usize] {
        &self.topological
    }

    /// Revisions that no revision follows, in id order.
    pub fn heads(&self) -> Vec<usize> {
        (0..self.revisions.len()).filter(|&i| self.children[i].is_empty()).collect()
    }

    /// The revision and every revision it follows, directly or not.
    pub fn ancestors(&self, index: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![index];
        while let Some(i) = stack.pop() {
            if seen.insert(i) {
                stack.extend(&self.parents[i]);
            }
        }
        seen
    }

    /// Among `set`, the members that no other member follows (the "current" revisions when
    /// `set` is the applied set).
    pub fn tips(&self, set: &BTreeSet<usize>) -> Vec<usize> {
        set.iter().copied().filter(|&i| !self.children[i].iter().any(|c| set.contains(c))).collect()
    }
}

/// Kahn's algorithm with the smallest index first; on a cycle, returns which revisions never
/// became ready (those on a cycle or after one).
fn topological_order(parents: &[Vec<usize>], children: &[Vec<usize>]) -> Result<Vec<usize>, Vec<bool>> {
    let mut waiting: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut ready: BTreeSet<usize> = (0..parents.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(parents.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &child in &children[i] {
            waiting[child] -= 1;
            if waiting[child] == 0 {
                ready.insert(child);
            }
        }
    }
    if order.len() == parents.len() { Ok(order) } else { Err(waiting.iter().map(|&w| w > 0).collect()) }
}

/// Follows stuck parents from a stuck revision until one repeats, and returns the loop in
/// order, its first revision repeated at the end.
fn cycle_through(parents: &[Vec<usize>], stuck: &[bool]) -> Vec<usize> {
    let start = stuck.iter().position(|&s| s).expect("a stuck revision");
    let mut path = vec![start];
    let mut position = HashMap::from([(start, 0)]);
    let mut current = start;
    loop {
        // A stuck revision waits on at least one stuck parent; following them must loop.
        let next = *parents[current].iter().find(|&&p| stuck[p]).expect("a stuck parent");
        if let Some(&at) = position.get(&next) {
            let mut cycle = path[at..].to_vec();
            cycle.reverse();
            cycle.push(cycle[0]);
            return cycle;
        }
        position.insert(next, path.len());
        path.push(next);
        current = next;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::source::{Phase, Section, checksum};

    pub(crate) fn revision(id: &str, parents: Option<&[&str]>) -> Revision {
        let path = PathBuf::from(format!("{id}_r.sql"));
        let section = |sql: &str| Section { sql: sql.to_owned(), path: path.clone(), first_line: 1 };
        Revision {
            id: id.to_owned(),
            name: "r".into(),
            path: path.clone(),
            declared_parents: parents.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
            phase: Phase::Expand,
            phase_declared: false,
            no_transaction: false,
            down_no_transaction: false,
            up: section(&format!("SELECT {id};")),
            down: Some(section("SELECT 0;")),
            checksum: checksum(&format!("SELECT {id};")),
            allows: Vec::new(),
            origin: crate::source::Origin::Files,
        }
    }

    fn ids(graph: &Graph, indexes: impl IntoIterator<Item = usize>) -> Vec<String> {
        indexes.into_iter().map(|i| graph.revision(i).id.clone()).collect()
    }

    #[test]
    fn linear_history_follows_id_order() {
        let graph = Graph::new(vec![revision("3", None), revision("1", None), revision("2", None)]).unwrap();
        assert_eq!(ids(&graph, graph.topological().to_vec()), ["1", "2", "3"]);
        assert_eq!(ids(&graph, graph.heads()), ["3"]);
        assert_eq!(ids(&graph, graph.ancestors(graph.find("2").unwrap())), ["1", "2"]);
    }

    #[test]
    fn branches_and_merges() {
        let graph = Graph::new(vec![
            revision("1", None),
            revision("2", Some(&["1"])),
            revision("3", Some(&["1"])),
            revision("4", Some(&["2", "3"])),
            revision("5", Some(&["2"])),
        ])
        .unwrap();
        assert_eq!(ids(&graph, graph.heads()), ["4", "5"]);
        assert_eq!(ids(&graph, graph.ancestors(graph.find("4").unwrap())), ["1", "2", "3", "4"]);
        let applied: BTreeSet<usize> = ["1", "2", "3"].iter().map(|i| graph.find(i).unwrap()).collect();
        assert_eq!(ids(&graph, graph.tips(&applied)), ["2", "3"]);
    }

    #[test]
    fn missing_parent_duplicate_and_cycle() {
        let err = Graph::new(vec![revision("1", Some(&["0"]))]).unwrap_err();
        assert!(matches!(err, Error::MissingParent { ref parent, .. } if parent == "0"), "{err}");

        let err = Graph::new(vec![revision("1", None), revision("1", None)]).unwrap_err();
        assert!(matches!(err, Error::DuplicateId { .. }), "{err}");

        let err = Graph::new(vec![
            revision("1", None),
            revision("2", Some(&["1", "3"])),
            revision("3", Some(&["2"])),
            revision("4", Some(&["3"])),
        ])
        .unwrap_err();
        let Error::Cycle { ids } = err else { panic!("{err}") };
        assert_eq!(ids.first(), ids.last());
        assert!(ids.contains(&"2".to_owned()) && ids.contains(&"3".to_owned()), "{ids:?}");
        assert!(!ids.contains(&"4".to_owned()));
    }
}
