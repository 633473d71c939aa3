//! The README's library example is `examples/library.rs`, word for word.

#[test]
fn the_readme_library_example_is_examples_library_rs() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/library.rs");
    let start = readme
        .find("```rust,no_run\n")
        .expect("README has the library example")
        + "```rust,no_run\n".len();
    let len = readme[start..].find("```\n").expect("the block ends");
    assert_eq!(
        &readme[start..start + len],
        example,
        "README.md's library example differs from examples/library.rs: copy the file into the README"
    );
}
