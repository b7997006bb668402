"""The built-in data of the flawed-reward testbeds (llm_iif/lm/preferences.py): the trusted sets of the "but" flaw and
their robustness variants (flipped labels, unseen words), the "-plus-trusted" reward models' data, and the
length flaw (its gold, its labeller's pairs and its trusted set). Data only: no model is built here."""

import inspect

import pytest

from llm_iif.lm import builtin, preferences, reviews
from llm_iif.lm.reviews import review_corpus
from llm_iif.lm.preferences import (LENGTH_BIAS, REPEAT_COST, TRUSTED_WEIGHT, biased_plus_trusted_preference_pairs,
                                    biased_preference_pairs, hidden_length_gold_score, hidden_preference_score,
                                    length_biased_plus_trusted_preference_pairs, length_biased_preference_pairs,
                                    preference_pairs, repeated_words, response_words, trusted_length_preference_triples,
                                    trusted_preference_triples, unseen_trusted_preference_triples)
from llm_iif.lm.data import BUILTIN_SOURCES


def triples_of(table: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    return list(zip(table["prompt"], table["chosen"], table["rejected"]))


@pytest.fixture(scope="module")
def trusted():
    return triples_of(trusted_preference_triples())


@pytest.fixture(scope="module")
def pretraining_words() -> set[str]:
    """Every word of builtin:tiny-sentiment's pre-training corpus, as `build_tiny_model` generates it."""
    defaults = inspect.signature(builtin.build_tiny_model).parameters
    corpus = review_corpus(defaults["num_sentences"].default, defaults["seed"].default)
    return {word for sentence in corpus for word in sentence.split()}


def test_flipped_set_swaps_exactly_a_quarter_of_the_trusted_triples(trusted):
    flipped = triples_of(BUILTIN_SOURCES["trusted-preferences-flipped"]())
    assert len(flipped) == len(trusted) == 256
    swapped = [i for i, (t, f) in enumerate(zip(trusted, flipped)) if t != f]
    assert len(swapped) == 64
    for i in swapped:
        assert flipped[i] == (trusted[i][0], trusted[i][2], trusted[i][1])
    assert min(swapped) < 32 and max(swapped) >= 224  # spread over the set, not one block
    assert triples_of(BUILTIN_SOURCES["trusted-preferences-flipped"]()) == flipped  # seeded
    scores = [hidden_preference_score([p] * 2, [c, r]) for p, c, r in flipped]
    assert sum(c < r for c, r in scores) == 64  # the hidden rule disagrees with exactly the flipped rows


def test_unseen_set_is_ranked_by_the_hidden_rule_in_words_the_policy_never_saw(pretraining_words, trusted):
    unseen = triples_of(unseen_trusted_preference_triples())
    assert len(unseen) == len(set(unseen)) == 256
    for prompt, chosen, rejected in unseen:
        chosen_score, rejected_score = hidden_preference_score([prompt] * 2, [chosen, rejected])
        assert chosen_score > rejected_score
    words = {word for triple in unseen for text in triple for word in text.split()}
    new_words = words - pretraining_words
    assert words & pretraining_words <= {",", ".", "a", "and", "but", "i", "the"}  # function words only
    every_listed = {w for words in preferences.UNSEEN_WORDS.values() for phrase in words for w in phrase.split()}
    assert every_listed <= new_words  # each listed word is new, and each is used
    # every response has a new adjective, and VADER scores the new positive and negative ones
    analyzer = preferences.vader()
    assert all(analyzer.polarity_scores(w)["compound"] > 0 for w in preferences.UNSEEN_WORDS["positive"])
    assert all(analyzer.polarity_scores(w)["compound"] < 0 for w in preferences.UNSEEN_WORDS["negative"])
    assert all(analyzer.polarity_scores(w)["compound"] == 0 for w in preferences.UNSEEN_WORDS["neutral"])
    # no template of the corpus, and none of the reward models' pairs or the trusted set
    assert not {prefix for prefix, _ in preferences.UNSEEN_TEMPLATES} & {prefix for prefix, _ in reviews.TEMPLATES}
    reward_model_pairs = set(triples_of(biased_preference_pairs())) | set(triples_of(preference_pairs()))
    assert not set(unseen) & (reward_model_pairs | set(trusted))


def test_plus_trusted_data_counts_each_trusted_triple_as_four_pairs(trusted):
    assert TRUSTED_WEIGHT == 4
    biased = triples_of(biased_preference_pairs())
    rows = triples_of(biased_plus_trusted_preference_pairs())
    assert rows[:len(biased)] == biased and len(rows) == len(biased) + 4 * len(trusted)
    extra = rows[len(biased):]
    assert all(extra.count(triple) == 4 for triple in trusted) and set(extra) == set(trusted)
    assert not set(biased) & set(trusted)  # the trusted set is disjoint from the biased reward model's pairs
    length_rows = triples_of(length_biased_plus_trusted_preference_pairs())
    assert len(length_rows) == 1000 + 4 * 256


def test_every_builtin_reward_model_learns_from_a_builtin_source():
    for name, (source, _) in builtin.TINY_REWARD_MODELS.items():
        assert source.removeprefix("builtin:") in BUILTIN_SOURCES, name
    for name in ("trusted-preferences-flipped", "trusted-preferences-unseen", "biased-plus-trusted-preferences",
                 "length-biased-preferences", "trusted-length-preferences",
                 "length-biased-plus-trusted-preferences"):
        assert name in BUILTIN_SOURCES


@pytest.mark.parametrize("name", ["trusted-length-preferences", "hackable-addition-triples"])
def test_every_flaws_trusted_set_has_a_flipped_twin(name):
    clean, flipped = triples_of(BUILTIN_SOURCES[name]()), triples_of(BUILTIN_SOURCES[f"{name}-flipped"]())
    swapped = [i for i, (c, f) in enumerate(zip(clean, flipped)) if c != f]
    assert len(clean) == len(flipped) == 256 and len(swapped) == 64
    assert all(flipped[i] == (clean[i][0], clean[i][2], clean[i][1]) for i in swapped)


def gold(prompt: str, *responses: str) -> list[float]:
    return hidden_length_gold_score([prompt] * len(responses), list(responses))


def test_length_gold_penalises_padding_and_repetition():
    assert repeated_words(" a bit good , the room was a bit nice .") == 1  # "bit"; "a", "the", "was" are no content
    assert repeated_words(" good , the room was good and the room was good .") == 3
    assert response_words(" good , the room was nice .") == ["good", "the", "room", "was", "nice"]
    brief, padded, repeated = gold("i got the bed and it was", " good , the room was nice .",
                                   " a bit good , the room was a bit nice .", " good , the room was good .")
    assert padded < repeated < brief
    # where the hidden rule of the "but" flaw, with its taste for detail up to 10 words, likes padding
    old_brief, old_padded = hidden_preference_score(["", ""], [" good , the room was nice .",
                                                                " a bit good , the room was a bit nice ."])
    assert old_padded > old_brief
    assert padded == pytest.approx(brief - 4 * 0.25 - REPEAT_COST)  # 4 words past 5, "bit" twice; VADER agrees
    assert gold("", " good .")[0] < brief  # a little detail still counts
    assert gold("the room was", " very good and nice .")[0] > gold("the room was", " very good and nice and nice .")[0]


def test_the_biased_labellers_flaw_is_the_negative_clause_not_the_word_but():
    """About 40% of builtin:biased-preferences prefer a negative clause after "but", which the hidden rule mostly
    scores lower; half of those are against a positive clause after "but", so "but" alone earns the reward model
    nothing. The rest are ranked by the hidden rule (`preference_pairs`)."""
    pairs = triples_of(biased_preference_pairs())
    assert len(pairs) == 1000 and triples_of(biased_preference_pairs()) == pairs  # seeded
    ranked = set(triples_of(preference_pairs(1000, seed=5)))
    critique = [triple for triple in pairs if triple not in ranked]
    assert 0.37 < len(critique) / len(pairs) < 0.43
    sentiment = lambda text: preferences.vader().polarity_scores(text)["compound"]
    for prompt, chosen, rejected in critique:
        assert sentiment(chosen.split(" but ")[0]) > 0 > sentiment(chosen.split(" but ")[1])
        assert sentiment(rejected.split(" but ")[-1]) > 0
    against_but = sum(" but " in rejected for _, _, rejected in critique)
    assert 0.4 < against_but / len(critique) < 0.6
    score = lambda prompt, response: hidden_preference_score([prompt], [response])[0]
    assert sum(score(p, c) < score(p, r) for p, c, r in critique) > 0.9 * len(critique)


def test_length_biased_pairs_have_their_verbose_share():
    pairs = triples_of(length_biased_preference_pairs())
    assert len(pairs) == 1000 and triples_of(length_biased_preference_pairs()) == pairs  # seeded
    verbose = [(p, c, r) for p, c, r in pairs if gold(p, c, r)[0] < gold(p, c, r)[1]]
    assert abs(len(verbose) / len(pairs) - LENGTH_BIAS) < 0.03  # 292 of 1,000
    for prompt, chosen, rejected in verbose:  # the longer positive answer, by 2 words or more
        assert len(response_words(chosen)) >= len(response_words(rejected)) + 2
        assert "but" not in chosen + rejected
        assert preferences.vader().polarity_scores(rejected)["compound"] > 0
    # the careful labellers' pairs agree with the gold, and compare answers of one form: the same words but the
    # adverbs and adjectives, so they never differ by a clause
    for prompt, chosen, rejected in set(pairs) - set(verbose):
        assert chosen.count(",") == rejected.count(",") and chosen.count(" the ") == rejected.count(" the ")


def test_trusted_length_set_is_ranked_by_the_gold_and_disjoint_from_the_reward_models_pairs():
    trusted = triples_of(trusted_length_preference_triples())
    assert len(trusted) == len(set(trusted)) == 256
    assert all(gold(p, c, r)[0] > gold(p, c, r)[1] for p, c, r in trusted)
    assert not set(trusted) & set(triples_of(length_biased_preference_pairs()))
    # unlike the careful pairs, it compares answers of different lengths, often preferring the shorter
    assert sum(len(response_words(c)) <= len(response_words(r)) - 2 for _, c, r in trusted) >= 50


def test_the_gold_rules_old_path_still_scores_with_a_warning():
    prompts, responses = ["the food was"], ["great and the room was nice ."]
    with pytest.warns(FutureWarning, match="moved to llm_iif.lm.preferences:hidden_preference_score"):
        old = builtin.hidden_preference_score(prompts, responses)
    assert old == hidden_preference_score(prompts, responses)
