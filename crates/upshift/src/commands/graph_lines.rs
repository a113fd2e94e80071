//! Draws a revision graph as text lanes, the way `git log --graph` does, for
//! `upshift migrate history`.

/// One revision to draw: its id and its parents' ids.
pub(crate) struct Node<'a> {
    pub(crate) id: &'a str,
    pub(crate) parents: Vec<&'a str>,
}

/// A drawn line: the lane art, and for node lines the index of the node.
pub(crate) struct Line {
    pub(crate) art: String,
    pub(crate) node: Option<usize>,
}

/// Draws `nodes`, given children before parents (newest first).
pub(crate) fn draw(nodes: &[Node<'_>]) -> Vec<Line> {
    let mut lanes: Vec<Option<&str>> = Vec::new();
    let mut drawn = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let expecting: Vec<usize> = (0..lanes.len()).filter(|&i| lanes[i] == Some(node.id)).collect();
        let column = expecting.first().copied().unwrap_or_else(|| free_lane(&mut lanes, 0));
        // Lanes that waited for this node join its lane: `|/`.
        if expecting.len() > 1 {
            let mut art = row(&lanes, |_| None);
            for &joining in &expecting[1..] {
                put(&mut art, 2 * joining - 1, '/');
                put(&mut art, 2 * joining, ' ');
                lanes[joining] = None;
            }
            while lanes.last() == Some(&None) {
                lanes.pop();
            }
            drawn.push(Line { art: art.trim_end().to_owned(), node: None });
        }
        lanes[column] = Some(node.id);
        drawn.push(Line { art: row(&lanes, |i| (i == column).then_some('*')), node: Some(index) });
        lanes[column] = node.parents.first().copied();
        // A merge opens a lane per further parent: `|\`.
        let mut opened = Vec::new();
        for &parent in node.parents.iter().skip(1) {
            if lanes.contains(&Some(parent)) {
                continue;
            }
            let slot = free_lane(&mut lanes, column + 1);
            lanes[slot] = Some(parent);
            opened.push(slot);
        }
        if !opened.is_empty() {
            let mut art = row(&lanes, |i| opened.contains(&i).then_some(' '));
            put(&mut art, 2 * column + 1, '\\');
            drawn.push(Line { art: art.trim_end().to_owned(), node: None });
        }
        while lanes.last() == Some(&None) {
            lanes.pop();
        }
    }
    drawn
}

/// The first unused lane from `from` on, adding one at the right when all are in use.
fn free_lane(lanes: &mut Vec<Option<&str>>, from: usize) -> usize {
    (from..lanes.len()).find(|&i| lanes[i].is_none()).unwrap_or_else(|| {
        lanes.push(None);
        lanes.len() - 1
    })
}

/// One character per lane (`|` when the lane is in use), separated by spaces; `mark`
/// overrides a lane's character.
fn row(lanes: &[Option<&str>], mark: impl Fn(usize) -> Option<char>) -> String {
    let mut art = String::new();
    for (i, lane) in lanes.iter().enumerate() {
        if i > 0 {
            art.push(' ');
        }
        art.push(mark(i).unwrap_or(if lane.is_some() { '|' } else { ' ' }));
    }
    art
}

fn put(art: &mut String, at: usize, c: char) {
    while art.len() <= at {
        art.push(' ');
    }
    art.replace_range(at..=at, &c.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(nodes: &[(&'static str, &[&'static str])]) -> String {
        let nodes: Vec<Node<'_>> = nodes.iter().map(|(id, parents)| Node { id, parents: parents.to_vec() }).collect();
        draw(&nodes)
            .iter()
            .map(|line| match line.node {
                Some(i) => format!("{} {}", line.art, nodes[i].id),
                None => line.art.clone(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn linear() {
        assert_eq!(render(&[("3", &["2"]), ("2", &["1"]), ("1", &[])]), "* 3\n* 2\n* 1");
    }

    #[test]
    fn branch_and_merge() {
        let drawn = render(&[("4", &["2", "3"]), ("3", &["1"]), ("2", &["1"]), ("1", &[])]);
        assert_eq!(drawn, "* 4\n|\\\n| * 3\n* | 2\n|/\n* 1");
    }

    #[test]
    fn two_open_heads() {
        let drawn = render(&[("3", &["1"]), ("2", &["1"]), ("1", &[])]);
        assert_eq!(drawn, "* 3\n| * 2\n|/\n* 1");
    }
}
