"""Known answers for cleaning and sentence splitting."""

from bertflow.text import clean_text, document_sentences, split_sentences


def test_clean_text_normalises_unicode_controls_and_whitespace():
    assert clean_text("Cafe\u0301\u0000  au\u200b\tlait \n\n  next  line ") == "Café au lait\nnext line"


def test_english_sentences_respect_abbreviations_and_initials():
    text = 'Mr. Smith met J. R. R. Tolkien in 1937. They talked! Did it rain? "Yes," he said. The U.S. Army left.'
    assert split_sentences(text) == [
        "Mr. Smith met J. R. R. Tolkien in 1937.", "They talked!", "Did it rain?",
        '"Yes," he said.', "The U.S. Army left."]


def test_lowercase_after_period_does_not_split():
    assert split_sentences("It costs 3.5 dollars, e.g. cheap. ok then") == ["It costs 3.5 dollars, e.g. cheap. ok then"]


def test_chinese_sentences_split_without_spaces():
    assert split_sentences("他说：“我不去。”然后走了。真的吗？是的！") == [
        "他说：“我不去。”", "然后走了。", "真的吗？", "是的！"]


def test_document_sentences_walk_paragraph_lines():
    assert document_sentences("One. Two.\nThree!") == ["One.", "Two.", "Three!"]
