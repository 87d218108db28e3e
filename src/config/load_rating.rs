//! The `load_rating` expression of least-load: real-number arithmetic over a
//! node's live figures, compiled once when the config loads into a typed tree
//! that evaluates by recursion — no allocation, no lookup by name, no dynamic
//! values per evaluation.
//!
//! Why not a crate: evalexpr (maintained) evaluates a tree of dynamically
//! typed `Value`s and collects each operator's arguments into a fresh `Vec`,
//! so every evaluation allocates; fasteval, which compiles, has had no release
//! since 2020. The grammar needed here is a page of code.
//!
//! Grammar (usual precedence, `^` binds tightest and to the right):
//!
//! ```text
//! expr    = term { ("+" | "-") term }
//! term    = unary { ("*" | "/") unary }
//! unary   = "-" unary | power
//! power   = primary [ "^" unary ]
//! primary = NUMBER | VARIABLE | FUNCTION "(" expr { "," expr } ")" | "(" expr ")"
//! ```
//!
//! Variables: see [`Variable`]. Functions: `min(a, b, ...)`, `max(a, b, ...)`,
//! `abs(x)`, `sqrt(x)`.

use std::fmt;

/// The figures an expression can name, in the order of [`Figures`]' array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variable {
    /// Active connections.
    Connections,
    /// The node's weight (load factor).
    Weight,
    /// New connections per second (EWMA).
    ConnectionRate,
    /// Bytes per second both ways (EWMA).
    TrafficRate,
    /// Bytes per second client → node (EWMA).
    RxRate,
    /// Bytes per second node → client (EWMA).
    TxRate,
    /// Connections since the node's figures began.
    TotalConnections,
    /// The number the node's load agent last answered (0 before it answers).
    AgentLoad,
}

impl Variable {
    pub const ALL: [Variable; 8] = [
        Variable::Connections,
        Variable::Weight,
        Variable::ConnectionRate,
        Variable::TrafficRate,
        Variable::RxRate,
        Variable::TxRate,
        Variable::TotalConnections,
        Variable::AgentLoad,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variable::Connections => "connections",
            Variable::Weight => "weight",
            Variable::ConnectionRate => "connection_rate",
            Variable::TrafficRate => "traffic_rate",
            Variable::RxRate => "rx_rate",
            Variable::TxRate => "tx_rate",
            Variable::TotalConnections => "total_connections",
            Variable::AgentLoad => "agent_load",
        }
    }
}

/// Values of every [`Variable`] for one node, indexed by `Variable as usize`.
pub type Figures = [f64; 8];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Number(f64),
    Load(Variable),
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Neg,
    Abs,
    Sqrt,
    /// Minimum of the top `n` values.
    Min(u8),
    Max(u8),
}

/// Tallest expression tree accepted (a chain `a + b + ...` is as tall as it is long).
const MAX_HEIGHT: usize = 128;
/// Deepest nesting of parentheses, functions and signs the parser accepts.
const MAX_NESTING: usize = 64;
/// Most arguments of `min` / `max`.
const MAX_ARGS: usize = 16;

/// A compiled `load_rating` expression. Equal when written the same.
#[derive(Debug, Clone)]
pub struct LoadRating {
    source: String,
    root: Tree,
    /// Bit `v as usize` set when the expression reads variable `v`.
    uses: u8,
}

/// The compiled form: a tree whose leaves are matched in place, so reading a
/// figure or a constant costs no call.
#[derive(Debug, Clone)]
enum Tree {
    Number(f64),
    Load(Variable),
    Neg(Box<Tree>),
    Abs(Box<Tree>),
    Sqrt(Box<Tree>),
    Add(Box<(Tree, Tree)>),
    Sub(Box<(Tree, Tree)>),
    Mul(Box<(Tree, Tree)>),
    Div(Box<(Tree, Tree)>),
    Pow(Box<(Tree, Tree)>),
    Min(Box<[Tree]>),
    Max(Box<[Tree]>),
}

impl Tree {
    /// Leaves are read in place; only inner nodes cost a call.
    #[inline(always)]
    fn operand(&self, figures: &impl Fn(Variable) -> f64) -> f64 {
        match self {
            Tree::Number(v) => *v,
            Tree::Load(var) => figures(*var),
            _ => self.eval(figures),
        }
    }

    fn eval(&self, figures: &impl Fn(Variable) -> f64) -> f64 {
        match self {
            Tree::Number(v) => *v,
            Tree::Load(var) => figures(*var),
            Tree::Neg(x) => -x.operand(figures),
            Tree::Abs(x) => x.operand(figures).abs(),
            Tree::Sqrt(x) => x.operand(figures).sqrt(),
            Tree::Add(ab) => ab.0.operand(figures) + ab.1.operand(figures),
            Tree::Sub(ab) => ab.0.operand(figures) - ab.1.operand(figures),
            Tree::Mul(ab) => ab.0.operand(figures) * ab.1.operand(figures),
            Tree::Div(ab) => ab.0.operand(figures) / ab.1.operand(figures),
            Tree::Pow(ab) => libm::pow(ab.0.operand(figures), ab.1.operand(figures)),
            Tree::Min(args) => args.iter().map(|t| t.operand(figures)).fold(f64::INFINITY, f64::min),
            Tree::Max(args) => args
                .iter()
                .map(|t| t.operand(figures))
                .fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

impl PartialEq for LoadRating {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// A bad expression: what is wrong and where (1-based character column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRatingError {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for LoadRatingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at column {}: {}", self.column, self.message)
    }
}

impl LoadRating {
    /// Parses and compiles `source`.
    pub fn compile(source: &str) -> Result<LoadRating, LoadRatingError> {
        let mut parser = Parser {
            tokens: tokenize(source)?,
            at: 0,
            program: Vec::new(),
            end: source.chars().count() + 1,
            nesting: 0,
        };
        parser.expr()?;
        if let Some(t) = parser.tokens.get(parser.at) {
            return Err(t.error(format!("unexpected {}", t.kind)));
        }
        // The parser's postfix program, folded into a tree; each entry keeps
        // its height, bounded so that evaluation's recursion is too.
        let mut stack: Vec<(Tree, usize)> = Vec::new();
        for op in &parser.program {
            let (tree, height) = match *op {
                Op::Number(v) => (Tree::Number(v), 1),
                Op::Load(var) => (Tree::Load(var), 1),
                Op::Neg | Op::Abs | Op::Sqrt => {
                    let (x, h) = stack.pop().expect("the parser emits an operand first");
                    let x = Box::new(x);
                    let tree = match op {
                        Op::Neg => Tree::Neg(x),
                        Op::Abs => Tree::Abs(x),
                        _ => Tree::Sqrt(x),
                    };
                    (tree, h + 1)
                }
                Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Pow => {
                    let (b, hb) = stack.pop().expect("the parser emits two operands first");
                    let (a, ha) = stack.pop().expect("the parser emits two operands first");
                    let ab = Box::new((a, b));
                    let tree = match op {
                        Op::Add => Tree::Add(ab),
                        Op::Sub => Tree::Sub(ab),
                        Op::Mul => Tree::Mul(ab),
                        Op::Div => Tree::Div(ab),
                        _ => Tree::Pow(ab),
                    };
                    (tree, ha.max(hb) + 1)
                }
                Op::Min(n) | Op::Max(n) => {
                    let args = stack.split_off(stack.len() - usize::from(n));
                    let height = args.iter().map(|(_, h)| *h).max().unwrap_or(0) + 1;
                    let args = args.into_iter().map(|(t, _)| t).collect();
                    (
                        if matches!(op, Op::Min(_)) {
                            Tree::Min(args)
                        } else {
                            Tree::Max(args)
                        },
                        height,
                    )
                }
            };
            if height > MAX_HEIGHT {
                return Err(LoadRatingError {
                    column: 1,
                    message: format!("too deeply nested (more than {MAX_HEIGHT} operations deep)"),
                });
            }
            stack.push((tree, height));
        }
        let (root, _) = stack.pop().expect("the parser emits one expression");
        let uses = parser.program.iter().fold(0u8, |mask, op| match op {
            Op::Load(var) => mask | 1 << *var as usize,
            _ => mask,
        });
        Ok(LoadRating {
            source: source.to_string(),
            root,
            uses,
        })
    }

    /// Whether the expression reads `var` (figures it does not read need not
    /// be computed).
    pub fn uses(&self, var: Variable) -> bool {
        self.uses & (1 << var as usize) != 0
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression over one node's figures. Allocates nothing.
    pub fn eval(&self, figures: &Figures) -> f64 {
        self.eval_with(&|var| figures[var as usize])
    }

    /// Evaluates the expression, asking `figure` for each variable as it is
    /// read (so figures the expression does not read are never computed).
    /// Allocates nothing.
    pub fn eval_with(&self, figure: &impl Fn(Variable) -> f64) -> f64 {
        self.root.eval(figure)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Number(f64),
    Name(String),
    Symbol(char),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Number(n) => write!(f, "number {n}"),
            Kind::Name(n) => write!(f, "\"{n}\""),
            Kind::Symbol(c) => write!(f, "\"{c}\""),
        }
    }
}

struct Token {
    kind: Kind,
    /// 1-based character column.
    column: usize,
}

impl Token {
    fn error(&self, message: String) -> LoadRatingError {
        LoadRatingError {
            column: self.column,
            message,
        }
    }
}

fn tokenize(source: &str) -> Result<Vec<Token>, LoadRatingError> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            // An exponent: 1e3, 2.5E-4.
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    i = j;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let text: String = chars[start..i].iter().collect();
            let value: f64 = text.parse().map_err(|_| LoadRatingError {
                column,
                message: format!("\"{text}\" is not a number"),
            })?;
            tokens.push(Token {
                kind: Kind::Number(value),
                column,
            });
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(Token {
                kind: Kind::Name(chars[start..i].iter().collect()),
                column,
            });
        } else if "+-*/^(),".contains(c) {
            tokens.push(Token {
                kind: Kind::Symbol(c),
                column,
            });
            i += 1;
        } else {
            return Err(LoadRatingError {
                column,
                message: format!("unexpected character '{c}'"),
            });
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    program: Vec<Op>,
    /// Column just past the end, for "unexpected end" errors.
    end: usize,
    /// Current recursion depth, bounded so that no input overflows the stack.
    nesting: usize,
}

impl Parser {
    fn peek_symbol(&self) -> Option<char> {
        match self.tokens.get(self.at) {
            Some(Token {
                kind: Kind::Symbol(c), ..
            }) => Some(*c),
            _ => None,
        }
    }

    fn expect(&mut self, symbol: char) -> Result<(), LoadRatingError> {
        match self.tokens.get(self.at) {
            Some(Token {
                kind: Kind::Symbol(c), ..
            }) if *c == symbol => {
                self.at += 1;
                Ok(())
            }
            Some(t) => Err(t.error(format!("expected \"{symbol}\", found {}", t.kind))),
            None => Err(self.end_error(&format!("expected \"{symbol}\""))),
        }
    }

    fn end_error(&self, what: &str) -> LoadRatingError {
        LoadRatingError {
            column: self.end,
            message: format!("{what}, found the end of the expression"),
        }
    }

    fn expr(&mut self) -> Result<(), LoadRatingError> {
        self.term()?;
        while let Some(c @ ('+' | '-')) = self.peek_symbol() {
            self.at += 1;
            self.term()?;
            self.program.push(if c == '+' { Op::Add } else { Op::Sub });
        }
        Ok(())
    }

    fn term(&mut self) -> Result<(), LoadRatingError> {
        self.unary()?;
        while let Some(c @ ('*' | '/')) = self.peek_symbol() {
            self.at += 1;
            self.unary()?;
            self.program.push(if c == '*' { Op::Mul } else { Op::Div });
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<(), LoadRatingError> {
        // Every recursion goes through here.
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            let column = self.tokens.get(self.at).map_or(self.end, |t| t.column);
            return Err(LoadRatingError {
                column,
                message: format!("too deeply nested (more than {MAX_NESTING} levels)"),
            });
        }
        let result = self.unary_inner();
        self.nesting -= 1;
        result
    }

    fn unary_inner(&mut self) -> Result<(), LoadRatingError> {
        if self.peek_symbol() == Some('-') {
            self.at += 1;
            self.unary()?;
            self.program.push(Op::Neg);
            return Ok(());
        }
        self.primary()?;
        if self.peek_symbol() == Some('^') {
            self.at += 1;
            self.unary()?;
            self.program.push(Op::Pow);
        }
        Ok(())
    }

    fn primary(&mut self) -> Result<(), LoadRatingError> {
        let Some(token) = self.tokens.get(self.at) else {
            return Err(self.end_error("expected a number, a figure or \"(\""));
        };
        let column = token.column;
        match token.kind.clone() {
            Kind::Number(v) => {
                self.at += 1;
                self.program.push(Op::Number(v));
            }
            Kind::Symbol('(') => {
                self.at += 1;
                self.expr()?;
                self.expect(')')?;
            }
            Kind::Symbol(c) => {
                return Err(token.error(format!("expected a number, a figure or \"(\", found \"{c}\"")));
            }
            Kind::Name(name) => {
                self.at += 1;
                if let Some(var) = Variable::ALL.into_iter().find(|v| v.name() == name) {
                    self.program.push(Op::Load(var));
                    return Ok(());
                }
                if !matches!(name.as_str(), "min" | "max" | "abs" | "sqrt") {
                    let known: Vec<_> = Variable::ALL.iter().map(|v| v.name()).collect();
                    return Err(LoadRatingError {
                        column,
                        message: format!(
                            "unknown name \"{name}\"; figures are {}; functions are min, max, abs, sqrt",
                            known.join(", ")
                        ),
                    });
                }
                self.expect('(')?;
                let mut args = 1;
                self.expr()?;
                while self.peek_symbol() == Some(',') {
                    self.at += 1;
                    self.expr()?;
                    args += 1;
                }
                self.expect(')')?;
                let op = match (name.as_str(), args) {
                    ("abs", 1) => Op::Abs,
                    ("sqrt", 1) => Op::Sqrt,
                    ("min", 2..=MAX_ARGS) => Op::Min(args as u8),
                    ("max", 2..=MAX_ARGS) => Op::Max(args as u8),
                    ("abs" | "sqrt", _) => {
                        return Err(LoadRatingError {
                            column,
                            message: format!("{name}() takes one argument, not {args}"),
                        });
                    }
                    _ => {
                        return Err(LoadRatingError {
                            column,
                            message: format!("{name}() takes 2 to {MAX_ARGS} arguments, not {args}"),
                        });
                    }
                };
                self.program.push(op);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Figures {
        // connections, weight, connection_rate, traffic_rate, rx, tx, total, agent
        [4.0, 2.0, 0.5, 1500.0, 500.0, 1000.0, 80.0, 30.0]
    }

    fn eval(s: &str) -> f64 {
        LoadRating::compile(s).unwrap().eval(&figures())
    }

    #[test]
    fn arithmetic_with_precedence_and_figures() {
        assert_eq!(eval("connections / weight"), 2.0);
        assert_eq!(eval("1 + 2 * 3"), 7.0);
        assert_eq!(eval("(1 + 2) * 3"), 9.0);
        assert_eq!(eval("2 ^ 3 ^ 2"), 512.0);
        assert_eq!(eval("-2 ^ 2"), -4.0);
        assert_eq!(eval("10 - 4 - 3"), 3.0);
        assert_eq!(eval("1e3 / 2.5E1"), 40.0);
        assert_eq!(eval("agent_load * 10 + connections"), 304.0);
        assert_eq!(eval("traffic_rate - rx_rate - tx_rate"), 0.0);
        assert_eq!(eval("connection_rate + total_connections"), 80.5);
        assert_eq!(eval("max(connections, agent_load, 7) + min(weight, 1)"), 31.0);
        assert_eq!(eval("abs(-3) + sqrt(16)"), 7.0);
        assert!(eval("connections / 0").is_infinite());
        let r = LoadRating::compile("agent_load * 2 + connections").unwrap();
        let used: Vec<_> = Variable::ALL.into_iter().filter(|&v| r.uses(v)).collect();
        assert_eq!(used, [Variable::Connections, Variable::AgentLoad]);
    }

    #[test]
    fn errors_say_what_and_where() {
        let err = |s: &str| LoadRating::compile(s).unwrap_err();
        let e = err("connections / wieght");
        assert_eq!(e.column, 15);
        assert!(e.message.contains("unknown name \"wieght\""), "{e}");
        assert!(e.message.contains("agent_load"), "{e}");
        assert_eq!(err("1 +").column, 4);
        assert!(err("1 +").message.contains("end of the expression"));
        assert_eq!(err("(1 + 2").column, 7);
        assert_eq!(err("1 2").column, 3);
        assert_eq!(err("1 $ 2").column, 3);
        assert_eq!(err("min(1)").column, 1);
        assert_eq!(
            err("abs(1, 2)").to_string(),
            "at column 1: abs() takes one argument, not 2"
        );
        assert_eq!(err("").column, 1);
        assert_eq!(err("1..2").column, 1);
        let deep = format!("{}1{}", "(1 + ".repeat(40), ")".repeat(40));
        assert_eq!(LoadRating::compile(&deep).unwrap().eval(&figures()), 41.0);
        let long = vec!["1"; 200].join(" + ");
        assert!(err(&long).message.contains("too deeply nested"));
        let very_deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(err(&very_deep).message.contains("too deeply nested"));
        assert!(err(&"-".repeat(100_000)).message.contains("too deeply nested"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Any text compiles or is refused with a column inside it (or just
        /// past it); what compiles evaluates without panicking.
        #[test]
        fn any_text_compiles_or_is_refused_without_panic(
            text in "[-+*/^(),. 0-9a-z_eE]{0,40}|\\PC{0,20}",
            values in proptest::array::uniform8(-1e6f64..1e6),
        ) {
            match LoadRating::compile(&text) {
                Ok(rating) => {
                    let _ = rating.eval(&values);
                }
                Err(e) => proptest::prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1, "{e}"),
            }
        }
    }
}
